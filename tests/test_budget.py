"""``--budget`` specifications: parsed, validated, resolved against reference plans."""

from __future__ import annotations

import pytest

from ohq_tvm import Precision
from ohq_tvm.budget import DEFAULT_PARETO_POINTS, BudgetError, Budgets, BudgetSpec, Limit
from ohq_tvm.planner import reference_numbers

from testing_support import made_up_planning, planned_on_unreliable_timing

REFERENCES = {
    "fp32": {"latency_ms": 10.0, "size_bytes": 4e6, "memory_bytes": 6e5},
    "int8": {"latency_ms": 4.0, "size_bytes": 1e6, "memory_bytes": 1.5e5},
}


@pytest.mark.parametrize(
    ("text", "latency_ms", "size_bytes"),
    [
        ("latency=5ms", 5.0, None),
        ("latency=5", 5.0, None),
        ("latency=250us", 0.25, None),
        ("latency=0.8*int8", 3.2, None),
        ("latency=0.5x fp32", 5.0, None),
        ("latency=int8", 4.0, None),
        ("size=2MB", None, 2e6),
        ("size=512KiB", None, 524288.0),
        ("size=0.5*fp32", None, 2e6),
        ("latency=1e-3s, size=0.25*fp32", 1.0, 1e6),
    ],
)
def test_limits_resolve_to_units(text, latency_ms, size_bytes):
    spec = BudgetSpec.parse(text)
    got_latency = spec.latency.resolve("latency_ms", REFERENCES) if spec.latency else None
    got_size = spec.size.resolve("size_bytes", REFERENCES) if spec.size else None
    assert got_latency == pytest.approx(latency_ms) if latency_ms is not None else got_latency is None
    assert got_size == pytest.approx(size_bytes) if size_bytes is not None else got_size is None
    assert spec.pareto_points == 0 and not spec.knee


@pytest.mark.parametrize(
    ("text", "memory_bytes"),
    [
        ("memory=512KB", 512e3),
        ("memory=512KiB", 524288.0),
        ("memory=0.5*fp32", 3e5),
        ("memory=int8", 1.5e5),
        ("memory=2e-1 x fp32", 1.2e5),
    ],
)
def test_memory_limits_resolve_against_peak_memory(text, memory_bytes):
    spec = BudgetSpec.parse(text)
    assert spec.memory.resolve("memory_bytes", REFERENCES) == pytest.approx(memory_bytes)
    assert spec.latency is None and spec.size is None


def test_memory_combines_with_the_other_terms():
    spec = BudgetSpec.parse("latency=0.9*int8, size=2MB, memory=0.25*fp32, pareto=3")
    assert spec.latency.resolve("latency_ms", REFERENCES) == pytest.approx(3.6)
    assert spec.size.resolve("size_bytes", REFERENCES) == pytest.approx(2e6)
    assert spec.memory.resolve("memory_bytes", REFERENCES) == pytest.approx(1.5e5)
    assert spec.references() == {"int8", "fp32"}
    assert not BudgetSpec.parse("memory=1MB,pareto").knee


def test_a_spec_resolves_to_the_budgets_the_solver_reads():
    spec = BudgetSpec.parse("latency=0.9*int8, size=2MB, memory=0.25*fp32, pareto=3")
    assert spec.resolve(REFERENCES) == Budgets(
        latency_ms=pytest.approx(3.6), size_bytes=2e6, memory_bytes=1.5e5
    )
    assert BudgetSpec.parse("size=0.5*fp32").resolve(REFERENCES) == Budgets(size_bytes=2e6)
    assert BudgetSpec.parse("pareto").resolve(REFERENCES) == Budgets()  # no limit: every quantity free
    with pytest.raises(BudgetError, match="no int4w plan"):
        BudgetSpec.parse("latency=int4w").resolve(REFERENCES)


def test_pareto_alone_builds_the_knee_and_with_limits_only_sweeps():
    alone = BudgetSpec.parse("pareto")
    assert alone.pareto_points == DEFAULT_PARETO_POINTS and alone.knee
    assert BudgetSpec.parse("pareto=5").pareto_points == 5
    both = BudgetSpec.parse("latency=0.9*int8,pareto=4")
    assert both.pareto_points == 4 and not both.knee
    assert both.references() == {"int8"}
    assert str(both) == "latency=0.9*int8,pareto=4"


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "empty budget"),
        ("speed=2", "unknown budget term"),
        ("latency=fast", "'fast' is not a plan"),
        ("latency=5 parsecs", "give a unit (ms, s, us)"),
        ("latency=fast!", "cannot read"),
        ("latency=5kb", "give a unit"),
        ("size=3", "give a unit"),
        ("latency=0*int8", "must be positive"),
        ("latency=1ms,latency=2ms", "twice"),
        ("pareto=1", ">= 2"),
        ("latency=0.8*int3", "not a plan"),
        ("memory=3", "give a unit (b, kb, mb, gb, kib, mib)"),
        ("memory=5ms", "give a unit"),
        ("memory=0.5*int3", "'int3' is not a plan"),
        ("memory=0*fp32", "must be positive"),
        ("memory=-1MB", "cannot read"),
        ("memory=", "cannot read"),
        ("memory=1MB,memory=2MB", "sets memory twice"),
        ("mem=1MB", "memory=512KB"),
    ],
)
def test_bad_budgets_name_the_term(text, fragment):
    with pytest.raises(BudgetError) as caught:
        BudgetSpec.parse(text)
    assert fragment in str(caught.value)
    assert "\n" not in str(caught.value)


def test_a_reference_plan_the_board_lacks_is_named():
    with pytest.raises(BudgetError, match="no int4w plan") as caught:
        Limit(factor=0.5, reference="int4w").resolve("latency_ms", REFERENCES)
    assert "fp32, int8" in str(caught.value)


def test_a_relative_latency_budget_is_relative_to_the_uniform_plan_as_timed_whole():
    planning = planned_on_unreliable_timing(made_up_planning())
    in_model = planning.measurement.in_model
    whole_ms = in_model.runs[Precision.INT8].measured_ms
    int8 = planning.baselines["int8"].predicted
    # Its factor is clamped: the scaled parts predict far more than the board measured whole.
    assert in_model.runs[Precision.INT8].clamped and int8["latency_ms"] > 2 * whole_ms
    references = reference_numbers(planning.baselines, in_model)
    assert references["int8"]["latency_ms"] == whole_ms
    assert references["fp32"]["latency_ms"] == in_model.runs[Precision.FP32].measured_ms
    assert references["int8"]["size_bytes"] == int8["size_bytes"]  # sizes stay predicted
    budget = BudgetSpec.parse("latency=1.1*int8,size=0.5*fp32")
    assert budget.latency.resolve("latency_ms", references) == pytest.approx(1.1 * whole_ms)
    assert (
        budget.size.resolve("size_bytes", references)
        == 0.5 * planning.baselines["fp32"].predicted["size_bytes"]
    )
    # Without whole-model timings (--parts-only) a relative budget follows the prediction.
    alone = reference_numbers(planning.baselines, None)
    assert BudgetSpec.parse("latency=int8").latency.resolve("latency_ms", alone) == int8["latency_ms"]
