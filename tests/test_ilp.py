"""The integer program: its optimum equals brute-force enumeration under the reference latency model."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from ohq_tvm import Precision, models
from ohq_tvm.frontend import load_onnx
from ohq_tvm.ilp import Budgets, Problem, greedy, knee, pareto_frontier, solve
from ohq_tvm.oqa import extract_workloads
from ohq_tvm.plan import Plan, PlanError

OPTIONS = [Precision.FP32, Precision.INT8, Precision.INT4W]


def _problem(seed: int) -> Problem:
    """tiny_cnn's real workload graph, with made-up latencies and sensitivities."""
    workloads = extract_workloads(load_onnx(models.tiny_cnn()).mod, OPTIONS)
    rng = np.random.default_rng(seed)
    latencies = {}
    fused = []
    for workload in workloads.unique():
        if workload.fused_layer is not None:
            fused.append(workload)
            continue
        base = {"layer": 1.0, "quantize": 0.15, "dequantize": 0.15, "glue": 0.1}[workload.kind]
        speed = {Precision.FP32: 1.0, Precision.INT8: 0.55, Precision.INT4W: 0.7}.get(workload.precision, 1.0)
        latencies[workload.key] = base * speed * rng.uniform(0.5, 1.5)
    # A conversion fused into a layer: the layer's latency plus what the conversion adds, of either sign
    # (an integer layer writing float32 can be faster than its requantize).
    for workload in fused:
        latencies[workload.key] = latencies[workload.fused_layer.key] + rng.uniform(-0.1, 0.15)
    sensitivity = {
        layer_id: {Precision.INT8: rng.uniform(0.0, 0.2), Precision.INT4W: rng.uniform(0.1, 1.0)}
        for layer_id in workloads.layers
    }
    return Problem(workloads, latencies, sensitivity)


def _all_plans(problem: Problem) -> list[tuple[dict, dict]]:
    plans = []
    for combo in itertools.product(*[problem.options(lid) for lid in problem.layers]):
        assignment = dict(zip(problem.layers, combo, strict=True))
        plans.append((assignment, problem.evaluate(assignment)))
    return plans


@pytest.fixture(scope="module", params=[1, 2, 4])
def case(request):
    problem = _problem(request.param)
    return problem, _all_plans(problem)


def test_optimum_equals_brute_force_under_latency_budgets(case):
    problem, plans = case
    assert len(plans) == 3**7
    latencies = sorted(values["latency_ms"] for _, values in plans)
    for quantile in (0.02, 0.1, 0.3, 0.6, 0.95):
        budget = latencies[int(quantile * (len(latencies) - 1))]
        best = min(v["sensitivity"] for _, v in plans if v["latency_ms"] <= budget + 1e-9)
        plan = solve(problem, budgets=Budgets(latency_ms=budget))
        assert plan.predicted["latency_ms"] <= budget + 1e-9
        assert plan.predicted["sensitivity"] == pytest.approx(best, rel=1e-6, abs=1e-9)
        assert plan.predicted == problem.evaluate(plan.assignments)


def test_optimum_equals_brute_force_with_size_and_sensitivity_budgets(case):
    problem, plans = case
    sizes = sorted(v["size_bytes"] for _, v in plans)
    latencies = sorted(v["latency_ms"] for _, v in plans)
    size, latency = sizes[len(sizes) // 4], latencies[len(latencies) // 2]
    feasible = [v for _, v in plans if v["size_bytes"] <= size and v["latency_ms"] <= latency + 1e-9]
    plan = solve(problem, budgets=Budgets(latency_ms=latency, size_bytes=size))
    assert plan.predicted["sensitivity"] == pytest.approx(min(v["sensitivity"] for v in feasible), abs=1e-9)
    # The other direction: the fastest plan under a sensitivity budget, and the fewest bit-operations.
    level = sorted(v["sensitivity"] for _, v in plans)[len(plans) // 3]
    fastest = solve(problem, "latency", Budgets(sensitivity=level))
    allowed = [v for _, v in plans if v["sensitivity"] <= level + 1e-9]
    assert fastest.predicted["latency_ms"] == pytest.approx(min(v["latency_ms"] for v in allowed), rel=1e-6)
    proxy = solve(problem, "bops", Budgets(sensitivity=level))
    assert proxy.source == "bops-proxy"
    assert proxy.predicted["bops"] == pytest.approx(min(v["bops"] for v in allowed), rel=1e-9)


# Activation bytes per element: uint8 for integer layers, float32 otherwise.
ACTIVATION_BYTES = {Precision.FP32: 4, Precision.INT8: 1, Precision.INT4W: 1}


def _working_set(problem: Problem, layer_id: str, precision: Precision) -> int:
    info = problem.workloads.infos[layer_id]
    elements = int(np.prod(info.input_shape)) + int(np.prod(info.output_shape))
    return info.weight_bytes(precision) + elements * ACTIVATION_BYTES[precision]


def test_evaluate_reports_the_largest_layer_working_set():
    problem = _problem(0)
    rng = np.random.default_rng(7)
    for _ in range(20):
        assignment = {lid: OPTIONS[rng.integers(len(OPTIONS))] for lid in problem.layers}
        sets = [_working_set(problem, lid, p) for lid, p in assignment.items()]
        assert problem.evaluate(assignment)["memory_bytes"] == max(sets)
    # dw2 reads and writes 72x16x16 activations: in fp32 it is the peak, in int8 a quarter of that.
    fp32 = dict.fromkeys(problem.layers, Precision.FP32)
    assert problem.evaluate(fp32)["memory_bytes"] == 4 * 2 * 72 * 16 * 16 + 72 * 9 * 4
    int8 = dict(fp32, dw2=Precision.INT8, expand2=Precision.INT8, project2=Precision.INT8)
    assert problem.evaluate(int8)["memory_bytes"] == _working_set(problem, "pw1", Precision.FP32)


def test_optimum_equals_brute_force_under_memory_budgets(case):
    problem, plans = case
    peaks = sorted({v["memory_bytes"] for _, v in plans})
    assert len(peaks) >= 4
    budgets = [*peaks[:-1], (peaks[0] + peaks[1]) / 2, (peaks[-2] + peaks[-1]) / 2]
    for budget in budgets:
        best = min(v["sensitivity"] for _, v in plans if v["memory_bytes"] <= budget)
        assert best > 0  # the budget excludes the all-fp32 plan, the unconstrained optimum
        plan = solve(problem, budgets=Budgets(memory_bytes=budget))
        assert plan.predicted["memory_bytes"] <= budget
        assert plan.predicted["sensitivity"] == pytest.approx(best, rel=1e-6, abs=1e-9)
        assert plan.predicted == problem.evaluate(plan.assignments)


def test_optimum_equals_brute_force_under_memory_and_latency_budgets(case):
    problem, plans = case
    peaks = sorted({v["memory_bytes"] for _, v in plans})
    latencies = sorted(v["latency_ms"] for _, v in plans)
    both_bind = 0
    for memory in peaks[1:-1]:
        for latency in (latencies[len(latencies) // 5], latencies[len(latencies) // 2]):
            fits_latency = [v for _, v in plans if v["latency_ms"] <= latency + 1e-9]
            fits_both = [v for v in fits_latency if v["memory_bytes"] <= memory]
            best = min(v["sensitivity"] for v in fits_both)
            plan = solve(problem, budgets=Budgets(latency_ms=latency, memory_bytes=memory))
            assert plan.predicted["latency_ms"] <= latency + 1e-9
            assert plan.predicted["memory_bytes"] <= memory
            assert plan.predicted["sensitivity"] == pytest.approx(best, rel=1e-6, abs=1e-9)
            latency_only = min(v["sensitivity"] for v in fits_latency)
            memory_only = min(v["sensitivity"] for _, v in plans if v["memory_bytes"] <= memory)
            both_bind += best > max(latency_only, memory_only) + 1e-9
    assert both_bind  # at least one pair where neither budget alone gives the optimum


def test_infeasible_memory_budget_names_the_smallest_peak(case):
    problem, plans = case
    smallest = min(v["memory_bytes"] for _, v in plans)
    leanest = max(min(_working_set(problem, lid, p) for p in OPTIONS) for lid in problem.layers)
    assert smallest == leanest
    plan = solve(problem, budgets=Budgets(memory_bytes=smallest))
    assert plan.predicted["memory_bytes"] == smallest
    with pytest.raises(PlanError) as caught:
        solve(problem, budgets=Budgets(memory_bytes=smallest - 1))
    message = str(caught.value)
    assert f"peak memory budget {smallest - 1:g} bytes" in message
    assert f"smallest any plan reaches, {smallest:.6g} bytes" in message
    assert "\n" not in message


def test_infeasible_budget_names_the_smallest_reachable_latency(case):
    problem, plans = case
    fastest = min(v["latency_ms"] for _, v in plans)
    with pytest.raises(PlanError, match=f"smallest any plan reaches, {fastest:.6g} ms"):
        solve(problem, budgets=Budgets(latency_ms=fastest * 0.9))


def test_pareto_points_are_the_brute_force_frontier(case):
    problem, plans = case
    frontier = pareto_frontier(problem, points=25)
    values = [(v["latency_ms"], v["sensitivity"]) for _, v in plans]
    for plan in frontier:
        lat, sens = plan.predicted["latency_ms"], plan.predicted["sensitivity"]
        dominated = any(
            (a <= lat + 1e-12 and b <= sens + 1e-12) and (a < lat - 1e-9 or b < sens - 1e-9)
            for a, b in values
        )
        assert not dominated, plan.predicted
    assert len(frontier) >= 4
    latencies = [p.predicted["latency_ms"] for p in frontier]
    sensitivities = [p.predicted["sensitivity"] for p in frontier]
    assert latencies == sorted(latencies) and sensitivities == sorted(sensitivities, reverse=True)


def _point(latency_ms: float, sensitivity: float) -> Plan:
    return Plan({"a": "fp32"}, predicted={"latency_ms": latency_ms, "sensitivity": sensitivity})


def test_knee_is_the_point_farthest_below_the_chord():
    # Fastest (1 ms, loss 1.0) to most accurate (5 ms, loss 0): the chord is loss = (5 - x) / 4.
    points = [_point(1, 1.0), _point(2, 0.2), _point(3, 0.1), _point(5, 0.0)]
    assert knee(points[::-1]).predicted["latency_ms"] == 2  # 0.75 - 0.2 below the chord, the most
    assert knee(points[:2]).predicted["latency_ms"] == 1  # two points: the fastest
    with pytest.raises(PlanError, match="empty"):
        knee([])


def test_knee_of_a_real_frontier_is_on_it(case):
    problem, _ = case
    frontier = pareto_frontier(problem, points=12)
    chosen = knee(frontier)
    assert chosen in frontier
    assert frontier[0].predicted["latency_ms"] <= chosen.predicted["latency_ms"]


def test_greedy_meets_the_budget_but_never_beats_the_solver(case):
    problem, plans = case
    latencies = sorted(v["latency_ms"] for _, v in plans)
    for budget in (latencies[len(latencies) // 10], latencies[len(latencies) // 2]):
        baseline = greedy(problem, budget)
        optimum = solve(problem, budgets=Budgets(latency_ms=budget))
        assert baseline.predicted["latency_ms"] <= budget + 1e-9
        assert optimum.predicted["sensitivity"] <= baseline.predicted["sensitivity"] + 1e-9


def test_missing_inputs_are_clear_errors():
    problem = _problem(0)
    with pytest.raises(PlanError, match="no sensitivity for layer 'dw1'"):
        Problem(
            problem.workloads,
            problem.latencies_ms,
            {k: v for k, v in problem.sensitivity.items() if k != "dw1"},
        )
    partial = dict(problem.latencies_ms)
    partial.popitem()
    with pytest.raises(PlanError, match="measure the model first"):
        Problem(problem.workloads, partial, problem.sensitivity)
    with pytest.raises(PlanError, match="unknown objective"):
        solve(problem, "speed")
