"""QDQ export: ONNX Runtime runs the plan with its integer kernels and agrees with the TVM module."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from ohq_tvm import OHQError, Precision, models
from ohq_tvm.calibration import calibrate, synthetic_batches
from ohq_tvm.frontend import load_onnx
from ohq_tvm.layers import quantizable_layers
from ohq_tvm.passes import ApplyPlan
from ohq_tvm.plan import Plan
from ohq_tvm.qdq import export_qdq

from testing_support import run_local


@pytest.fixture(scope="module")
def tiny():
    imported = load_onnx(models.tiny_cnn())
    return imported, calibrate(imported, "minmax", num_samples=4)


def _ort(model, x, fused=False):
    """ONNX Runtime on ``model``: as ONNX defines QDQ (each op on its own), or ``fused`` into its integer
    kernels (what a deployment runs; not exact on x86 without VNNI, where int16 pair sums saturate)."""
    options = ort.SessionOptions()
    if not fused:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0]


def _plan(imported, **overrides):
    plan = Plan.uniform(quantizable_layers(imported.mod), Precision.INT8)
    for layer, precision in overrides.items():
        plan.assign(layer, precision)
    return plan


@pytest.mark.parametrize(
    "overrides", [{}, {"stem_conv": "fp32", "dw2": "int4w", "classifier": "fp32"}], ids=["int8", "mixed"]
)
def test_onnx_runtime_on_the_qdq_export_agrees_with_the_tvm_module(tiny, overrides):
    imported, calibration = tiny
    plan = _plan(imported, **overrides)
    qdq = export_qdq(imported, plan, calibration)
    ops = [node.op_type for node in qdq.graph.node]
    integer_layers = sum(p is not Precision.FP32 for p in plan.assignments.values())
    assert ops.count("DequantizeLinear") >= 2 * integer_layers  # weights and activations (plus biases)
    x = synthetic_batches(imported.inputs, 1, seed=21)[0]["input"]
    expected = _ort(qdq, x)
    (got,) = run_local(ApplyPlan(plan, calibration)(imported.mod), x)
    (reference,) = run_local(imported.mod, x)
    # Same integer arithmetic: equal up to float rounding, far below the quantization error itself.
    scale = np.abs(expected).max()
    assert np.abs(got - expected).max() <= 1e-5 * scale
    assert np.abs(reference - expected).max() > 1e-3 * scale
    # ONNX Runtime's fused integer kernels run the same plan, exactly where the CPU has VNNI or sdot.
    assert np.abs(_ort(qdq, x, fused=True) - expected).max() <= 2e-2 * scale


def test_fp32_plan_exports_the_float_model(tiny):
    imported, _ = tiny
    qdq = export_qdq(imported, Plan.uniform(quantizable_layers(imported.mod), "fp32"), None)
    assert not any(node.op_type.endswith("QuantizeLinear") for node in qdq.graph.node)
    x = synthetic_batches(imported.inputs, 1, seed=1)[0]["input"]
    np.testing.assert_allclose(_ort(qdq, x), _ort(imported.onnx_model, x), rtol=1e-4, atol=1e-5)


def test_export_writes_a_file_and_refuses_missing_calibration(tmp_path, tiny):
    imported, calibration = tiny
    path = export_qdq(imported, _plan(imported), calibration, tmp_path / "q" / "model.qdq.onnx")
    assert (tmp_path / "q" / "model.qdq.onnx").stat().st_size > 0
    assert {p.key: p.value for p in path.metadata_props}["ohq_tvm.plan"].count("int8") == 7
    with pytest.raises(OHQError, match="no calibration range"):
        export_qdq(imported, _plan(imported), None)
