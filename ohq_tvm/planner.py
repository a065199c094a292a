"""``plan_model``: measure (OQA), estimate (MQE), solve (ILP): a plan from the board's own numbers."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import onnx

from .board import Board, BoardConnection, open_board
from .budget import BudgetSpec
from .errors import OHQError, PlanError
from .frontend import ImportedModel, load_onnx
from .ilp import Budgets, Problem, greedy, knee, pareto_frontier, solve
from .mqe import Sensitivity, estimate_sensitivity
from .oqa.database import default_database_path
from .oqa.in_model import InModelScales
from .oqa.run import ModelMeasurement, measure_model
from .plan import Plan
from .precision import Precision
from .progress import StageProgress, as_progress
from .samples import AUTO_SYNTHETIC, SYNTHETIC_DATA, ModelMadeData, resolve_synthetic, synthetic_label
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


def plan_model(
    model: str | os.PathLike | onnx.ModelProto | ImportedModel,
    target: str | BoardSpec = "host",
    *,
    connection: BoardConnection | None = None,
    database: str | os.PathLike | None = None,
    precisions: Sequence[Precision | str] | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    budget: BudgetSpec | str | None = None,
    num_batches: int = 4,
    synthetic: str = AUTO_SYNTHETIC,
    sensitivity_cache: str | os.PathLike | None = None,
    trials: int = 0,
    tuning_dir: str | os.PathLike | None = None,
    frontier_points: int | None = None,
    progress: StageProgress | Callable[[str], None] | None = None,
    board: Board | None = None,
    whole_model: bool = True,
) -> PlanningResult:
    """The least-sensitive plan within ``budget``, from latency measured on the board.

    ``budget`` is a :class:`~ohq_tvm.budget.BudgetSpec` or its text (``"latency=0.8*int8"``,
    ``"latency=5ms,size=2MB"``, ``"memory=0.5*fp32"``, ``"pareto"``, ...; none: the least-loss plan).
    Relative limits are resolved against the reference plans (``fp32`` and uniform plans of each lower
    precision): their latency as timed whole on the board (with ``whole_model``), their predicted
    weight size and peak memory (:func:`reference_numbers`). Baselines in the result: those reference
    plans, ``greedy`` (same latency budget) and ``bops-proxy`` (fewest bit-operations at the chosen
    plan's sensitivity and within its size and memory budgets, as hardware-blind methods pick). MQE runs
    on ``num_batches`` synthetic batches of kind ``synthetic`` (default ``auto``: distilled from the
    model's BatchNormalization statistics when the ONNX file has them, else inverted from a classifier, else
    Gaussian). With ``sensitivity_cache`` (a
    JSON path) MQE's estimate is read from there when it answers the same question (same model,
    precisions, data and batches) and written there otherwise. ``trials`` > 0 times operators as tuned
    builds (see :func:`~ohq_tvm.oqa.run.measure_model`). ``frontier_points`` asks for a Pareto sweep of
    at least that many budgets (default: the budget's ``pareto=N``, else none). ``progress``: a
    :class:`~ohq_tvm.progress.StageProgress` (bars) or a message callback. ``board``: an open
    :class:`~ohq_tvm.board.Board` serving measurement and MQE (left open), instead of
    ``connection`` (default: the loopback host board). ``whole_model`` (default): the uniform plans are
    also built whole and timed on the board, and each precision's layer latencies scaled so that the sum
    of parts matches them (:mod:`~ohq_tvm.oqa.in_model`); without it, plans are predicted from the parts
    as measured alone.

    When the board's timings contradict each other even after timing the outliers again
    (:mod:`~ohq_tvm.oqa.in_model`), planning goes on: ``progress`` gets a ``warning:`` line and
    :attr:`PlanningResult.timing_unreliable` says why.

    Raises :class:`PlanError` for infeasible budgets (naming the smallest reachable latency, and the
    contradicting timings when there are some),
    :class:`~ohq_tvm.budget.BudgetError` for unreadable ones, and the errors of measurement and import.
    Measurements finished before an error or interruption stay in the database.
    """
    hooks = as_progress(progress)
    say = hooks.say
    spec = resolve_target(target)
    imported = model if isinstance(model, ImportedModel) else load_onnx(model, input_shapes)
    wanted = budget if isinstance(budget, BudgetSpec) or budget is None else BudgetSpec.parse(budget)
    # One board for measurement and MQE (a loopback one starts once, on first use).
    with contextlib.ExitStack() as stack:
        if board is None:
            board = stack.enter_context(open_board(connection, spec))
        if board.emulation is not None:
            say(
                f"warning: board {board.label} is emulated ({board.emulation}): the plan is chosen from "
                "emulated latencies, which are not the board's"
            )
        measurement = measure_model(
            imported,
            spec,
            database=database,
            precisions=precisions,
            progress=hooks.measured,
            on_plan=hooks.measuring,
            trials=trials,
            tuning_dir=tuning_dir,
            tuning_progress=hooks.tuning,
            board=board,
            whole_model=whole_model,
            say=say,
        )
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
        data = resolve_synthetic(imported, synthetic)
        sensitivity, reused = _sensitivity(
            imported, spec, board, lower, data, num_batches, sensitivity_cache, hooks
        )
    if reused:
        say(f"sensitivity: reused {sensitivity_cache}")
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
    points = max(frontier_points or 0, wanted.pareto_points if wanted else 0)
    frontier = pareto_frontier(problem, points) if points else []
    if wanted is not None and wanted.knee:
        plan = Plan(dict(knee(frontier).assignments), source="ilp-knee", **meta)
        plan.predicted = problem.evaluate(plan.assignments)
    else:
        try:
            plan = solve(problem, "sensitivity", budgets, **meta)
        except PlanError as err:
            if not unreliable:
                raise
            raise PlanError(f"{err}; {unreliable}") from None
    plan.notes = (
        f"budget: {wanted or 'none (least loss)'} -> {budgets}; sensitivity: {sensitivity.data}, "
        f"{sensitivity.batches} batches"
    )
    if budgets.latency_ms is not None:
        baselines["greedy"] = greedy(problem, budgets.latency_ms)
    baselines["bops-proxy"] = solve(
        problem,
        "bops",
        Budgets(
            sensitivity=plan.predicted["sensitivity"],
            size_bytes=budgets.size_bytes,
            memory_bytes=budgets.memory_bytes,
        ),
        **meta,
    )
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


def _sensitivity(
    imported, spec, board, precisions, kind, num_batches, cache, hooks
) -> tuple[Sensitivity, bool]:
    """MQE's estimate on ``num_batches`` synthetic batches of ``kind``, from ``cache`` when it answers the
    same question, else run on the board."""
    if cache is not None and Path(cache).is_file():
        try:
            cached = Sensitivity.load(cache)
        except OHQError:
            cached = None
        label = synthetic_label(kind)
        if cached is not None and cached.matches(imported.sha256, precisions, label, num_batches):
            return cached, True
    maker = SYNTHETIC_DATA[kind]
    if isinstance(maker, ModelMadeData):
        hooks.say(maker.describe(num_batches))
    sensitivity = estimate_sensitivity(
        imported,
        precisions,
        num_batches=num_batches,
        synthetic=kind,
        target=spec,
        board=board,
        progress=hooks.estimating,
        data_progress=hooks.distilling,
    )
    if cache is not None:
        sensitivity.save(cache)
    return sensitivity, False


__all__ = ["PlanningResult", "default_sensitivity_cache", "plan_model", "reference_numbers"]
