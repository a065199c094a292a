"""The entry points' configs: validated once with one clear error, JSON round trips, and the flat keyword
arguments they replace still read (with a DeprecationWarning)."""

from __future__ import annotations

import json

import pytest

from ohq_tvm import Precision, models
from ohq_tvm.budget import BudgetSpec
from ohq_tvm.config import (
    CalibrationConfig,
    MeasurementConfig,
    PlanningConfig,
    TuningConfig,
    VerificationConfig,
    configs_from_keywords,
)
from ohq_tvm.errors import BudgetError, ConfigError, PlanError
from ohq_tvm.pipeline import compile_model


@pytest.mark.parametrize(
    "config",
    [
        MeasurementConfig("m.sqlite", ("fp32", "int8"), whole_model=True, workers=2, operator_budget=10),
        PlanningConfig(
            "latency=0.9*int8,pareto=4", "m.sqlite", ("int8",), mqe_batches=2, mqe_data="distilled"
        ),
        PlanningConfig(),
        CalibrationConfig("percentile", "images/", normalization="tf", synthetic="matched"),
        VerificationConfig(verify=False, fidelity_samples=0, min_agreement=0.95, eval_images="val/"),
        TuningConfig(64, "tuning/"),
    ],
)
def test_a_config_survives_json(config):
    data = json.loads(json.dumps(config.to_json()))
    assert type(config).from_json(data) == config


def test_text_becomes_typed_values():
    planning = PlanningConfig(budget="latency=0.9*int8", precisions=["fp32", "int8"])
    assert planning.budget == BudgetSpec.parse("latency=0.9*int8")
    assert planning.precisions == (Precision.FP32, Precision.INT8)
    assert planning.to_json()["budget"] == "latency=0.9*int8"
    assert planning.measurement() == MeasurementConfig(precisions=("fp32", "int8"), whole_model=True)


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (lambda: MeasurementConfig(workers=0), ConfigError, "workers must be at least 1, not 0"),
        (
            lambda: MeasurementConfig(schedule="fast"),
            ConfigError,
            "unknown schedule 'fast'; choose one of default",
        ),
        (lambda: MeasurementConfig(precisions=[]), ConfigError, "no precisions to measure"),
        (lambda: PlanningConfig(budget="latency=fast"), BudgetError, "'fast' is not a plan"),
        (lambda: PlanningConfig(mqe_batches=0), ConfigError, "mqe_batches must be at least 1, not 0"),
        (lambda: PlanningConfig(mqe_data="noise"), ConfigError, "unknown MQE data 'noise'"),
        (lambda: CalibrationConfig(method="max"), ConfigError, "unknown calibration method 'max'; choose"),
        (lambda: CalibrationConfig(normalization="bgr"), ConfigError, "unknown normalization 'bgr'"),
        (
            lambda: VerificationConfig(min_agreement=1.5),
            ConfigError,
            "min_agreement is a fraction from 0 to 1",
        ),
        (lambda: VerificationConfig(fidelity_samples=-1), ConfigError, "fidelity_samples must be at least 0"),
        (lambda: TuningConfig(trials=-5), ConfigError, "trials must be at least 0, not -5"),
        (lambda: TuningConfig.from_json({"trial": 3}), ConfigError, "TuningConfig has no trial"),
    ],
)
def test_a_bad_value_is_one_clear_error(make, error, message):
    with pytest.raises(error, match=message):
        make()


def test_old_keywords_fold_into_the_configs_with_a_warning():
    configs = {"planning": PlanningConfig(), "tuning": TuningConfig(trials=8)}
    renamed = {"num_batches": "mqe_batches"}
    with pytest.warns(DeprecationWarning) as warned:
        folded = configs_from_keywords("f", {"tuning_dir": "t/", "num_batches": 2}, configs, renamed)
    assert [str(w.message) for w in warned] == [
        "f(tuning_dir=...) is deprecated; pass tuning=TuningConfig(tuning_dir=...) instead",
        "f(num_batches=...) is deprecated; pass planning=PlanningConfig(mqe_batches=...) instead",
    ]
    assert folded == {
        "planning": PlanningConfig(mqe_batches=2),
        "tuning": TuningConfig(trials=8, tuning_dir="t/"),
    }
    assert configs == {"planning": PlanningConfig(), "tuning": TuningConfig(trials=8)}  # left as it was
    with pytest.raises(TypeError, match="f\\(\\) got an unexpected keyword argument 'trails'"):
        configs_from_keywords("f", {"trails": 3}, configs, renamed)


def test_compile_model_reads_its_old_keywords_before_any_work(tmp_path):
    model = models.tiny_cnn()
    deprecated = pytest.warns(DeprecationWarning, match="pass verification=VerificationConfig")
    with deprecated, pytest.raises(ConfigError, match="min_agreement"):
        compile_model(model, "host", tmp_path / "a", min_agreement=2.0)
    # A budget among the old keywords still plans, so it still conflicts with a precision.
    deprecated = pytest.warns(DeprecationWarning, match="pass planning=PlanningConfig")
    with deprecated, pytest.raises(PlanError, match="one of a precision, a plan or a budget"):
        compile_model(model, "host", tmp_path / "b", precision="int8", budget="latency=int8")
    with pytest.raises(PlanError, match="one of a precision, a plan or a budget"):
        compile_model(model, "host", tmp_path / "c", precision="int8", planning=PlanningConfig())
    assert not any((tmp_path / name).exists() for name in "abc")
