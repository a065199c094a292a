"""``plan_model`` with its stages passed in: a latency source, a sensitivity estimator and a solver that
are fakes here (made-up board numbers), so the planner's own logic is checked without a board."""

from __future__ import annotations

import dataclasses

import pytest

from ohq_tvm import Precision
from ohq_tvm.budget import Budgets, BudgetSpec
from ohq_tvm.config import PlanningConfig
from ohq_tvm.errors import ConfigError, PlanError
from ohq_tvm.ilp import ILPSolver, Problem, solve
from ohq_tvm.mqe import SensitivityEstimate
from ohq_tvm.plan import Plan
from ohq_tvm.planner import plan_model

from testing_support import made_up_planning, new_tvm_exec_processes, tvm_exec_processes


class FakeLatencySource:
    """The board's numbers, made up: what :func:`made_up_planning` measured, the predicted one too."""

    def __init__(self, measurement):
        self.measurement = measurement
        self.asked = 0

    def measure(self, imported, hooks):
        self.asked += 1
        return self.measurement


class FakeEstimator:
    """A fixed sensitivity; records the precisions it was asked for."""

    def __init__(self, sensitivity, reused=False):
        self.sensitivity = sensitivity
        self.reused = reused
        self.asked: list[list[Precision]] = []

    def estimate(self, imported, precisions, hooks):
        self.asked.append(list(precisions))
        return SensitivityEstimate(self.sensitivity, self.reused)


class FakeSolver:
    """Answers with fixed plans; records what it was asked."""

    def __init__(self, chosen: Plan, frontier: list[Plan]):
        self.chosen = chosen
        self.frontier_plans = frontier
        self.calls: list[tuple] = []

    def least_loss(self, problem, budgets, **meta):
        self.calls.append(("least_loss", budgets, meta))
        return self.chosen

    def frontier(self, problem, points):
        self.calls.append(("frontier", points))
        return self.frontier_plans

    def baselines(self, problem, chosen, budgets, **meta):
        self.calls.append(("baselines", chosen))
        return {"other-method": chosen}


@pytest.fixture(scope="module")
def made_up():
    planning = made_up_planning()
    measurement = planning.measurement
    every = {**measurement.latencies_ms, **measurement.summary.predicted_ms}
    return planning, dataclasses.replace(measurement, latencies_ms=every)


def test_the_plan_is_the_solvers_answer_within_the_budget_resolved_against_the_uniform_plans(made_up):
    planning, measurement = made_up
    before = tvm_exec_processes()
    source, estimator = FakeLatencySource(measurement), FakeEstimator(planning.sensitivity)
    messages: list[str] = []
    result = plan_model(
        measurement.imported,
        "host",
        planning=PlanningConfig(budget="latency=0.8*fp32"),
        latency_source=source,
        estimator=estimator,
        progress=messages.append,
    )
    assert not new_tvm_exec_processes(before)  # no board was opened: the stages passed in serve it all
    assert source.asked == 1 and estimator.asked == [[Precision.INT8]]
    problem = Problem(measurement.workloads, measurement.latencies_ms, planning.sensitivity.values)
    fp32_ms = problem.evaluate(Plan.uniform(list(measurement.workloads.layers), "fp32").assignments)[
        "latency_ms"
    ]
    assert result.budgets == Budgets(latency_ms=pytest.approx(0.8 * fp32_ms))
    expected = solve(problem, "sensitivity", result.budgets)
    assert result.plan.assignments == expected.assignments
    assert result.plan.predicted["latency_ms"] <= 0.8 * fp32_ms + 1e-9
    assert result.plan.target == "host" and result.plan.model_sha256 == measurement.imported.sha256
    assert list(result.baselines) == ["fp32", "int8", "greedy", "bops-proxy"]
    assert (
        result.baselines["bops-proxy"].predicted["sensitivity"] <= result.plan.predicted["sensitivity"] + 1e-9
    )
    assert result.frontier == [] and result.budget == BudgetSpec.parse("latency=0.8*fp32")
    assert f"operators: {measurement.summary.measured} measured now, 20 from the database" in messages
    assert any(m.startswith("sensitivity: 32 forward passes") for m in messages)


def test_the_planner_asks_the_solver_it_is_given(made_up):
    planning, measurement = made_up
    chosen = dataclasses.replace(planning.plan)
    solver = FakeSolver(chosen, planning.frontier)
    result = plan_model(
        measurement.imported,
        "host",
        planning=PlanningConfig(budget="size=0.5*fp32,pareto=3", frontier_points=5),
        latency_source=FakeLatencySource(measurement),
        estimator=FakeEstimator(planning.sensitivity, reused=True),
        solver=solver,
    )
    assert result.plan is chosen and result.sensitivity_reused
    assert result.frontier == planning.frontier
    fp32_size = result.baselines["fp32"].predicted["size_bytes"]
    assert solver.calls == [
        ("frontier", 5),  # the larger of the config's points and the budget's pareto=3
        (
            "least_loss",
            Budgets(size_bytes=0.5 * fp32_size),
            {"model_sha256": measurement.imported.sha256, "target": "host"},
        ),
        ("baselines", chosen),
    ]
    assert list(result.baselines) == ["fp32", "int8", "other-method"]
    assert chosen.notes.startswith("budget: size=0.5*fp32,pareto=3 -> Budgets(")


def test_a_frontier_alone_builds_its_knee(made_up):
    planning, measurement = made_up
    result = plan_model(
        measurement.imported,
        "host",
        planning=PlanningConfig(budget="pareto=4"),
        latency_source=FakeLatencySource(measurement),
        estimator=FakeEstimator(planning.sensitivity),
        solver=ILPSolver(),
    )
    assert result.plan.source == "ilp-knee"
    assert result.plan.assignments in [p.assignments for p in result.frontier] and len(result.frontier) >= 2


def test_failed_operators_and_an_fp32_only_board_stop_the_planner(made_up):
    planning, measurement = made_up
    summary = dataclasses.replace(measurement.summary, failed={"conv-1": "the session dropped"})
    failed = dataclasses.replace(measurement, summary=summary)
    with pytest.raises(PlanError, match=r"1 operator\(s\) failed on board host-loopback \(e.g. the session"):
        plan_model(
            measurement.imported,
            "host",
            latency_source=FakeLatencySource(failed),
            estimator=FakeEstimator(planning.sensitivity),
        )
    layers = {lid: {Precision.FP32: o[Precision.FP32]} for lid, o in measurement.workloads.layers.items()}
    fp32_only = dataclasses.replace(
        measurement, workloads=dataclasses.replace(measurement.workloads, layers=layers)
    )
    estimator = FakeEstimator(planning.sensitivity)
    with pytest.raises(PlanError, match="no precision other than fp32"):
        plan_model(
            measurement.imported, "host", latency_source=FakeLatencySource(fp32_only), estimator=estimator
        )
    assert estimator.asked == []  # nothing to estimate


def test_the_keyword_arguments_before_the_configs_still_work_and_say_they_are_deprecated(made_up):
    planning, measurement = made_up
    stages = {
        "latency_source": FakeLatencySource(measurement),
        "estimator": FakeEstimator(planning.sensitivity),
    }
    with pytest.warns(DeprecationWarning, match=r"plan_model\(budget=...\) is deprecated; pass planning="):
        result = plan_model(measurement.imported, "host", budget="latency=0.8*fp32", **stages)
    assert str(result.budget) == "latency=0.8*fp32"
    with (
        pytest.warns(DeprecationWarning, match="mqe_batches"),
        pytest.raises(ConfigError, match="mqe_batches"),
    ):
        plan_model(measurement.imported, "host", num_batches=0, **stages)
    with pytest.raises(TypeError, match="unexpected keyword argument 'batches'"):
        plan_model(measurement.imported, "host", batches=2, **stages)
