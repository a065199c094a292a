"""Plans: validated on construction, exact JSON round-trip, and rejected with one clear line when wrong."""

from __future__ import annotations

import json

import pytest

import ohq_tvm
from ohq_tvm import Precision, budget, errors, models
from ohq_tvm.frontend import load_onnx
from ohq_tvm.layers import quantizable_layers
from ohq_tvm.passes import AnnotateCandidates, candidates
from ohq_tvm.plan import Plan, PlanError
from ohq_tvm.targets import resolve_target


@pytest.fixture(scope="module")
def tiny():
    mod = AnnotateCandidates(resolve_target("rpi4b"))(load_onnx(models.tiny_cnn()).mod)
    return quantizable_layers(mod), candidates(mod)


def test_json_round_trip_is_exact(tmp_path):
    plan = Plan(
        {"dw1": "int8", "pw1": Precision.INT4W, "stem_conv": "fp32"},
        model_sha256="ab" * 32,
        target="rpi4b",
        calibration="entropy",
        source="ilp",
        predicted={"latency_ms": 1.25, "size_bytes": 4096},
        notes="budget 0.8*int8",
    )
    path = plan.save(tmp_path / "plans" / "plan.json")
    loaded = Plan.load(path)
    assert loaded == plan
    assert loaded.assignments["pw1"] is Precision.INT4W
    assert json.loads(path.read_text())["assignments"] == {"dw1": "int8", "pw1": "int4w", "stem_conv": "fp32"}


def test_uniform_plans_and_counts(tiny):
    layers, _ = tiny
    plan = Plan.uniform(layers, "int8", target="rpi4b")
    assert plan.source == "uniform" and plan.counts() == {"int8": 7}
    assert plan.precision_of("dw2") is Precision.INT8


def test_counts_text_puts_the_most_common_precision_first():
    plan = Plan({"a": Precision.FP32, "b": Precision.INT8, "c": Precision.INT8, "d": Precision.INT4W})
    assert plan.counts_text() == "2 int8, 1 fp32, 1 int4w"
    assert plan.counts_text(compact=True) == "2xint8 1xfp32 1xint4w"


def test_valid_plan_passes_validation(tiny):
    layers, allowed = tiny
    plan = Plan({layer.layer_id: "int8" for layer in layers} | {"stem_conv": "fp32", "classifier": "fp32"})
    plan.validate_against(layers, allowed)


def test_unknown_layer_suggests_close_names(tiny):
    layers, allowed = tiny
    plan = Plan({layer.layer_id: "fp32" for layer in layers} | {"expnad2": "int8"})
    with pytest.raises(
        PlanError, match=r"layer 'expnad2', which the model does not have; did you mean expand2"
    ):
        plan.validate_against(layers, allowed)


def test_missing_layer_and_disallowed_precision(tiny):
    layers, allowed = tiny
    with pytest.raises(PlanError, match=r"no precision for layer\(s\) classifier"):
        Plan({layer.layer_id: "fp32" for layer in layers[:-1]}).validate_against(layers, allowed)
    plan = Plan({layer.layer_id: "fp32" for layer in layers} | {"dw1": "fp16"}, target="rpi4b")
    with pytest.raises(
        PlanError, match=r"'dw1' in fp16, not allowed on rpi4b \(allowed: fp32, int8, int4w\)"
    ):
        plan.validate_against(layers, allowed)
    pinned = Plan({layer.layer_id: "int8" for layer in layers})
    with pytest.raises(PlanError, match=r"'stem_conv' in int8, not allowed"):
        pinned.validate_against(layers, allowed)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"assignments": {"a": "int3"}}, "unknown precision 'int3'"),
        ({"assignments": {"a": "int8"}, "calibration": "magic"}, "unknown calibration method 'magic'"),
        ({"assignments": {"a": "int8"}, "predicted": {"latency_ms": "fast"}}, "must be a number"),
    ],
)
def test_invalid_plans_fail_on_construction(kwargs, message):
    with pytest.raises(Exception, match=message):
        Plan(**kwargs)


def test_loading_bad_files(tmp_path):
    with pytest.raises(PlanError, match="does not exist"):
        Plan.load(tmp_path / "none.json")
    (tmp_path / "x.json").write_text('{"format": "something-else"}')
    with pytest.raises(PlanError, match=r"x\.json: not an ohq-tvm plan"):
        Plan.load(tmp_path / "x.json")


def test_assign_parses_the_precision(tiny):
    layers, allowed = tiny
    plan = Plan.uniform(layers, "int8")
    plan.assign("stem_conv", "FP32")
    plan.assign("classifier", Precision.FP32)
    assert plan.precision_of("stem_conv") is Precision.FP32
    plan.validate_against(layers, allowed)
    with pytest.raises(Exception, match="unknown precision 'int2'"):
        plan.assign("dw1", "int2")


def test_plan_files_that_are_not_plan_objects(tmp_path):
    (tmp_path / "list.json").write_text('[{"stem_conv": "int8"}]')
    with pytest.raises(
        PlanError, match=r"list\.json: not an ohq-tvm plan \(a JSON list, not a JSON object\)"
    ):
        Plan.load(tmp_path / "list.json")
    (tmp_path / "bare.json").write_text('{"format": "ohq-tvm/plan", "format_version": 1}')
    with pytest.raises(PlanError, match=r"bare\.json: the plan has no 'assignments'"):
        Plan.load(tmp_path / "bare.json")


def test_plan_and_budget_errors_are_in_the_error_family():
    # One module holds every error a user can cause; the stages re-export theirs.
    assert errors.PlanError is PlanError is ohq_tvm.PlanError
    assert errors.BudgetError is budget.BudgetError is ohq_tvm.BudgetError
    assert issubclass(PlanError, errors.OHQError) and issubclass(errors.BudgetError, errors.OHQError)
