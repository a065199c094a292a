"""``plan_model``: measure (OQA), estimate (MQE), solve (ILP): a plan from the board's own numbers."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import onnx

from .board import Board, BoardConnection, open_board
from .budget import Budgets, BudgetSpec
from .config import PlanningConfig, TuningConfig, configs_from_keywords
from .errors import PlanError
from .frontend import ImportedModel, load_onnx
from .ilp import ILPSolver, Problem, Solver, knee
from .mqe import MQEEstimator, Sensitivity, SensitivityEstimator
from .oqa.database import default_database_path
from .oqa.in_model import InModelScales
from .oqa.run import BoardLatencySource, LatencySource, ModelMeasurement
from .plan import Plan
from .precision import Precision
from .progress import StageProgress, as_progress
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
    budget: BudgetSpec | None = None
    sensitivity_reused: bool = False

    @property
    def timing_unreliable(self) -> str | None:
        """Why the board's timings this plan was chosen from contradict each other (None: they agree)."""
        in_model = self.measurement.in_model
        return in_model.unreliable_text() if in_model is not None else None


# The keyword arguments plan_model took before its configs, where the field has another name: old -> new.
_RENAMED = {"num_batches": "mqe_batches", "synthetic": "mqe_data"}


def plan_model(
    model: str | os.PathLike | onnx.ModelProto | ImportedModel,
    target: str | BoardSpec = "host",
    *,
    connection: BoardConnection | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    planning: PlanningConfig | None = None,
    tuning: TuningConfig | None = None,
    progress: StageProgress | Callable[[str], None] | None = None,
    board: Board | None = None,
    latency_source: LatencySource | None = None,
    estimator: SensitivityEstimator | None = None,
    solver: Solver | None = None,
    **old_keywords,
) -> PlanningResult:
    """The least-sensitive plan within ``planning.budget``, from latency measured on the board.

    ``planning`` (:class:`~ohq_tvm.config.PlanningConfig`, default: the least-loss plan over every
    precision the board has) holds the budget, the candidates, the MQE data and whether the uniform
    plans are timed whole. The budget is a :class:`~ohq_tvm.budget.BudgetSpec` (``"latency=0.8*int8"``,
    ``"latency=5ms,size=2MB"``, ``"memory=0.5*fp32"``, ``"pareto"``, ...). Relative limits are resolved
    against the reference plans (``fp32`` and uniform plans of each lower precision): their latency as
    timed whole on the board (with ``whole_model``), their predicted weight size and peak memory
    (:func:`reference_numbers`). Baselines in the result: those reference plans and the solver's
    (``greedy`` and ``bops-proxy`` for the ILP). ``tuning.trials`` > 0 times operators as tuned builds
    (see :func:`~ohq_tvm.oqa.run.measure_model`). ``progress``: a :class:`~ohq_tvm.progress.StageProgress`
    (bars) or a message callback. ``board``: an open :class:`~ohq_tvm.board.Board` serving measurement
    and MQE (left open), instead of ``connection`` (default: the loopback host board).

    The stages are swappable: ``latency_source`` (default: OQA on the board,
    :class:`~ohq_tvm.oqa.run.BoardLatencySource`), ``estimator`` (default: MQE on the board,
    :class:`~ohq_tvm.mqe.MQEEstimator`) and ``solver`` (default: :class:`~ohq_tvm.ilp.ILPSolver`); a
    board is opened only for the default ones. The keyword arguments this function took before the
    configs (``budget``, ``database``, ``num_batches``, ...) are still read, with a ``DeprecationWarning``.

    When the board's timings contradict each other even after timing the outliers again
    (:mod:`~ohq_tvm.oqa.in_model`), planning goes on: ``progress`` gets a ``warning:`` line and
    :attr:`PlanningResult.timing_unreliable` says why.

    Raises :class:`PlanError` for infeasible budgets (naming the smallest reachable latency, and the
    contradicting timings when there are some),
    :class:`~ohq_tvm.budget.BudgetError` for unreadable ones, and the errors of measurement and import.
    Measurements finished before an error or interruption stay in the database.
    """
    configs = configs_from_keywords(
        "plan_model",
        old_keywords,
        {"planning": planning or PlanningConfig(), "tuning": tuning or TuningConfig()},
        _RENAMED,
    )
    planning, tuning = configs["planning"], configs["tuning"]
    hooks = as_progress(progress)
    spec = resolve_target(target)
    imported = model if isinstance(model, ImportedModel) else load_onnx(model, input_shapes)
    # One board for measurement and MQE (a loopback one starts once, on first use).
    with contextlib.ExitStack() as stack:
        if board is None and (latency_source is None or estimator is None):
            board = stack.enter_context(open_board(connection, spec))
        if latency_source is None:
            latency_source = BoardLatencySource(spec, board, planning.measurement(), tuning)
        if estimator is None:
            estimator = MQEEstimator(
                spec, board, planning.mqe_batches, planning.mqe_data, planning.sensitivity_cache
            )
        return choose_plan(imported, spec, planning, latency_source, estimator, solver or ILPSolver(), hooks)


def choose_plan(
    imported: ImportedModel,
    spec: BoardSpec,
    planning: PlanningConfig,
    latency_source: LatencySource,
    estimator: SensitivityEstimator,
    solver: Solver,
    hooks: StageProgress,
) -> PlanningResult:
    """:func:`plan_model` on resolved objects: ``imported``'s latencies from ``latency_source``, its
    sensitivity from ``estimator``, the plan from ``solver``, for a board of kind ``spec``. Raises as
    :func:`plan_model` does."""
    say = hooks.say
    wanted = planning.budget
    measurement = latency_source.measure(imported, hooks)
    summary = measurement.summary
    if summary.failed:
        raise PlanError(
            f"{len(summary.failed)} operator(s) failed on board {summary.board} "
            f"(e.g. {next(iter(summary.failed.values()))}); the {summary.measured} measured now are "
            f"kept in {measurement.database_path}: rerun to retry"
        )
    say(f"operators: {summary.measured} measured now, {summary.reused} from the database")
    unreliable = measurement.in_model.unreliable_text() if measurement.in_model else None
    if unreliable:
        say(f"warning: {unreliable}")
    lower = sorted(
        {p for options in measurement.workloads.layers.values() for p in options} - {Precision.FP32}
    )
    if not lower:
        raise PlanError("no precision other than fp32 to choose from; give --precisions with a lower one")
    sensitivity, reused = estimator.estimate(imported, lower, hooks)
    if reused:
        say(f"sensitivity: reused {planning.sensitivity_cache}")
    else:
        say(f"sensitivity: {sensitivity.forward_passes} forward passes in {sensitivity.seconds:.1f} s")
    problem = Problem(measurement.workloads, measurement.planning_latencies(), sensitivity.values)
    layers = list(measurement.workloads.layers)
    baselines = {"fp32": Plan.uniform(layers, Precision.FP32)}
    for precision in lower:
        if all(precision in options for options in measurement.workloads.layers.values()):
            baselines[precision.value] = Plan.uniform(layers, precision)
    for plan in baselines.values():
        plan.predicted = problem.evaluate(plan.assignments)
    references = reference_numbers(baselines, measurement.in_model)
    budgets = wanted.resolve(references) if wanted is not None else Budgets()
    meta = {"model_sha256": imported.sha256, "target": spec.name}
    points = max(planning.frontier_points, wanted.pareto_points if wanted else 0)
    frontier = solver.frontier(problem, points) if points else []
    if wanted is not None and wanted.knee:
        plan = Plan(dict(knee(frontier).assignments), source="ilp-knee", **meta)
        plan.predicted = problem.evaluate(plan.assignments)
    else:
        try:
            plan = solver.least_loss(problem, budgets, **meta)
        except PlanError as err:
            if not unreliable:
                raise
            raise PlanError(f"{err}; {unreliable}") from None
    plan.notes = (
        f"budget: {wanted or 'none (least loss)'} -> {budgets}; sensitivity: {sensitivity.data}, "
        f"{sensitivity.batches} batches"
    )
    baselines.update(solver.baselines(problem, plan, budgets, **meta))
    return PlanningResult(plan, baselines, frontier, measurement, sensitivity, budgets, wanted, reused)


def reference_numbers(baselines: Mapping[str, Plan], in_model: InModelScales | None) -> dict[str, dict]:
    """What a relative budget term (``latency=1.1*int8``) is resolved against: each reference plan's
    predicted numbers, its latency replaced by the uniform plan's as timed whole on the board when it was
    (``in_model``). Scaled parts give a uniform plan exactly that latency, unless its factor was clamped:
    then the budget still follows the board's whole-model timing, not the clamped prediction."""
    references = {name: dict(plan.predicted) for name, plan in baselines.items()}
    for precision, run in (in_model.runs if in_model is not None else {}).items():
        if precision.value in references:
            references[precision.value]["latency_ms"] = run.measured_ms
    return references


def default_sensitivity_cache(database: str | os.PathLike | None, imported: ImportedModel) -> Path:
    """Where MQE's estimate of a model is kept: next to the measurement database, one file per model."""
    root = Path(database) if database is not None else default_database_path()
    return root.parent / "sensitivity" / f"{imported.sha256[:16]}.json"


__all__ = ["PlanningResult", "choose_plan", "default_sensitivity_cache", "plan_model", "reference_numbers"]
