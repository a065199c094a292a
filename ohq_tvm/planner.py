"""``plan_model``: measure (OQA), estimate (MQE), solve (ILP): a plan from the board's own numbers."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import onnx

from .board import open_board
from .frontend import ImportedModel, load_onnx
from .ilp import Budgets, Problem, greedy, pareto_frontier, solve
from .mqe import Sensitivity, estimate_sensitivity
from .oqa.run import ModelMeasurement, measure_model
from .plan import Plan, PlanError
from .precision import Precision
from .targets import BoardSpec, resolve_target


@dataclass
class PlanningResult:
    """The chosen plan, the baselines it is compared with, the frontier, and the numbers behind them."""

    plan: Plan
    baselines: dict[str, Plan]
    frontier: list[Plan]
    measurement: ModelMeasurement
    sensitivity: Sensitivity
    budgets: Budgets


def plan_model(
    model: str | os.PathLike | onnx.ModelProto | ImportedModel,
    target: str | BoardSpec = "host",
    *,
    tracker: str | None = None,
    key: str | None = None,
    server: str | None = None,
    database: str | os.PathLike | None = None,
    precisions: Sequence[Precision | str] | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    latency_ms: float | None = None,
    latency_ratio: float | None = None,
    size_bytes: float | None = None,
    num_batches: int = 4,
    pareto_points: int = 0,
    say: Callable[[str], None] | None = None,
) -> PlanningResult:
    """The least-sensitive plan within the budgets, from latency measured on the board.

    ``latency_ratio`` sets the latency budget as a fraction of the all-fp32 plan's latency (``latency_ms``
    sets it in milliseconds). Baselines in the result: ``fp32`` and uniform plans of each integer
    precision, ``greedy`` (same latency budget) and ``bops-proxy`` (fewest bit-operations at the chosen
    plan's sensitivity, as hardware-blind methods pick). Raises :class:`PlanError` for infeasible budgets
    (naming the smallest reachable latency) and the errors of measurement and import.
    """
    say = say or (lambda _message: None)
    spec = target if isinstance(target, BoardSpec) else resolve_target(target)
    imported = model if isinstance(model, ImportedModel) else load_onnx(model, input_shapes)
    if latency_ms is not None and latency_ratio is not None:
        raise PlanError("give a latency budget in ms or as a ratio, not both")
    measurement = measure_model(
        imported, spec, tracker=tracker, key=key, server=server, database=database, precisions=precisions
    )
    summary = measurement.summary
    say(f"operators: {summary.measured} measured now, {summary.reused} from the database")
    chosen_precisions = sorted(
        {p for options in measurement.workloads.layers.values() for p in options} - {Precision.FP32}
    )
    if not chosen_precisions:
        raise PlanError("no precision other than fp32 to choose from; give --precisions with a lower one")
    with open_board(tracker, key, server, default_key=spec.rpc_key) as board:
        sensitivity = estimate_sensitivity(
            imported, chosen_precisions, num_batches=num_batches, target=spec, board=board
        )
    say(f"sensitivity: {sensitivity.forward_passes} forward passes in {sensitivity.seconds:.1f} s")
    problem = Problem(measurement.workloads, measurement.latencies_ms, sensitivity.values)
    layers = list(measurement.workloads.layers)
    baselines = {"fp32": Plan.uniform(layers, Precision.FP32)}
    for precision in chosen_precisions:
        if all(precision in options for options in measurement.workloads.layers.values()):
            baselines[precision.value] = Plan.uniform(layers, precision)
    for plan in baselines.values():
        plan.predicted = problem.evaluate(plan.assignments)
    if latency_ratio is not None:
        latency_ms = latency_ratio * baselines["fp32"].predicted["latency_ms"]
    budgets = Budgets(latency_ms=latency_ms, size_bytes=size_bytes)
    meta = {"model_sha256": imported.sha256, "target": spec.name}
    plan = solve(problem, "sensitivity", budgets, **meta)
    plan.notes = f"budgets: {budgets}; sensitivity: {sensitivity.data}, {sensitivity.batches} batches"
    if latency_ms is not None:
        baselines["greedy"] = greedy(problem, latency_ms)
    baselines["bops-proxy"] = solve(
        problem, "bops", Budgets(sensitivity=plan.predicted["sensitivity"], size_bytes=size_bytes), **meta
    )
    frontier = pareto_frontier(problem, pareto_points) if pareto_points else []
    return PlanningResult(plan, baselines, frontier, measurement, sensitivity, budgets)


__all__ = ["PlanningResult", "plan_model"]
