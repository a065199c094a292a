"""The XGBoost latency model: it learns a latency law from features and reports an honest CV error."""

from __future__ import annotations

import numpy as np
import pytest

from ohq_tvm import Precision, models
from ohq_tvm.errors import OHQError
from ohq_tvm.frontend import load_onnx
from ohq_tvm.oqa import extract_workloads
from ohq_tvm.oqa.latency_model import FEATURE_NAMES, LatencyModel, features

ALL = [Precision.FP32, Precision.FP16, Precision.INT8, Precision.INT4W]


@pytest.fixture(scope="module")
def workloads():
    rows = []
    for width in (0.35, 0.5, 0.75):
        imported = load_onnx(models.mobilenet_v2(size=64, width=width, classes=10))
        rows += extract_workloads(imported.mod, ALL).unique()
    return list({w.key: w for w in rows}.values())


def _law(workload) -> float:
    """A made-up board: time grows with MACs and bytes, integer layers pay 30% more, int4w 60%."""
    factor = {"fp32": 1.0, "fp16": 1.2, "int8": 1.3, "int4w": 1.6}[workload.precision.value]
    elements = np.prod(workload.input_shape)
    return 0.002 + 2e-7 * workload.macs * factor + 1e-6 * elements


def test_features_are_named_and_distinguish_precisions(workloads):
    layer = next(w for w in workloads if w.kind == "layer" and w.precision is Precision.INT8)
    assert len(features(layer)) == len(FEATURE_NAMES)
    twin = next(
        w
        for w in workloads
        if w.kind == "layer" and w.precision is Precision.FP32 and w.weight_shape == layer.weight_shape
    )
    assert features(layer) != features(twin)


def test_model_learns_the_law_and_its_cv_error_is_honest(workloads):
    assert len(workloads) > 100
    truth = np.array([_law(w) for w in workloads])
    model = LatencyModel.train(workloads, truth)
    assert model.training_rows == len(workloads) and model.folds == 5
    assert model.cv_mape_percent < 15
    # The same features with the latencies shuffled carry no signal: the reported error must say so.
    shuffled = LatencyModel.train(workloads, np.random.default_rng(0).permutation(truth))
    assert shuffled.cv_mape_percent > 3 * model.cv_mape_percent
    predicted = model.predict_ms(workloads)
    assert np.median(np.abs(predicted - truth) / truth) < 0.1


def test_too_few_measurements_is_a_clear_error(workloads):
    with pytest.raises(OHQError, match="at least 8 measurements"):
        LatencyModel.train(workloads[:3], [1.0, 2.0, 3.0])
