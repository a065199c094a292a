"""``measure_model``: the OQA stage as one call (what ``ohq-tvm measure`` runs)."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import onnx

from ..board import Board, BoardConnection, open_board
from ..calibration import calibrate
from ..codegen.tune import TuningProgress, tune_module
from ..codegen.tuning_database import TuningDatabase
from ..config import MeasurementConfig, TuningConfig, configs_from_keywords
from ..errors import TargetError
from ..frontend import ImportedModel, load_onnx
from ..layers import quantizable_layers
from ..passes.annotate import AnnotateCandidates
from ..passes.apply_plan import ApplyPlan
from ..plan import Plan
from ..precision import Precision
from ..progress import StageProgress
from ..targets import BoardSpec, resolve_target
from .cost import conversion_ms
from .database import LatencyDatabase
from .in_model import InModelScales, measured_scales
from .measure import MeasureEvent, Measurer, MeasureSummary, TimingConfig
from .workloads import ModelWorkloads, Workload, extract_workloads


@dataclass
class ModelMeasurement:
    """The workloads of a model and their latencies (ms, by key) on one board."""

    imported: ImportedModel
    board: BoardSpec
    workloads: ModelWorkloads
    latencies_ms: dict[str, float]
    summary: MeasureSummary
    database_path: str
    in_model: InModelScales | None = None  # with ``whole_model``: the uniform plans timed whole

    def planning_latencies(self) -> dict[str, float]:
        """The latencies a plan is predicted from: the measured ones, each layer scaled by its
        precision's in-model factor when the uniform plans were timed whole (see :mod:`.in_model`)."""
        if self.in_model is None:
            return dict(self.latencies_ms)
        return self.in_model.apply(self.workloads, self.latencies_ms)

    def latency_of(self, workload: Workload) -> float | None:
        """Measured median, else the latency model's prediction (see :meth:`is_predicted`), else None."""
        return self.latencies_ms.get(workload.key, self.summary.predicted_ms.get(workload.key))

    def conversion_of(self, workload: Workload) -> float | None:
        """A conversion's cost to a plan (:func:`~ohq_tvm.oqa.cost.conversion_ms`) from :meth:`latency_of`
        values, or None when one of them is missing."""
        needed = [workload] + ([workload.fused_layer] if workload.fused_layer is not None else [])
        values = {w.key: self.latency_of(w) for w in needed}
        if None in values.values():
            return None
        return conversion_ms(workload, values)

    def is_predicted(self, workload: Workload) -> bool:
        return workload.key not in self.latencies_ms and workload.key in self.summary.predicted_ms

    def layer_table(self) -> list[dict]:
        """One row per layer: its op and shape, and the latency (or ``None``) of each candidate precision."""
        rows = []
        for layer_id, options in self.workloads.layers.items():
            info = self.workloads.infos[layer_id]
            row = {"layer": layer_id, "op": info.op, "macs": info.macs}
            row["latency_ms"] = {p.value: self.latency_of(w) for p, w in options.items()}
            row["predicted"] = [p.value for p, w in options.items() if self.is_predicted(w)]
            for kind, table in (
                ("quantize", self.workloads.quantize),
                ("dequantize", self.workloads.dequantize),
            ):
                row[f"{kind}_ms"] = self.conversion_of(table[layer_id]) if layer_id in table else None
            rows.append(row)
        return rows

    def glue_ms(self) -> float:
        return sum(self.latencies_ms.get(w.key, 0.0) for w in self.workloads.glue)


# The keyword arguments measure_model took before its configs, where the field has another name: old -> new.
_RENAMED = {"budget": "operator_budget"}


def measure_model(
    model: str | os.PathLike | onnx.ModelProto | ImportedModel,
    target: str | BoardSpec = "host",
    *,
    connection: BoardConnection | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    measurement: MeasurementConfig | None = None,
    tuning: TuningConfig | None = None,
    timing: TimingConfig | None = None,
    progress: Callable[[MeasureEvent], None] | None = None,
    on_plan: Callable[[int, int], None] | None = None,
    tuning_progress: Callable[[TuningProgress], None] | None = None,
    board: Board | None = None,
    say: Callable[[str], None] | None = None,
    **old_keywords,
) -> ModelMeasurement:
    """Measure every candidate operator of ``model`` on a board into the database; return the latencies.

    ``target``: a board name, TOML path, triple, target JSON or :class:`BoardSpec`. The board is where
    ``connection`` says (a tracker, a bare server, an emulated board), by default this machine through
    a loopback RPC server; ``board``: an open :class:`~ohq_tvm.board.Board` to use (and leave open)
    instead. ``measurement`` (:class:`~ohq_tvm.config.MeasurementConfig`) says which operators, into
    which database, how (default: all the board computes, into the default database); ``timing`` how
    each is timed. ``on_plan(total, to_measure)`` is called once the database has been consulted,
    before measuring. With ``tuning.trials`` > 0 the candidates are first tuned with MetaSchedule on the
    board (:func:`tune_candidates`) and every operator is timed as built with those records
    (measurements are stored under the label ``tuned/<database>/r<revision>``, apart from the
    default-schedule ones). With ``measurement.whole_model``, once every part is measured, each uniform
    plan is also built whole and timed on the board (stored too), giving the in-model scales of
    :mod:`.in_model`; ``say`` receives its messages. When those timings contradict the parts', the
    outliers are timed again once; if they still do, ``in_model.unreliable`` says why and the rows
    measured in this call are marked unreliable in the database (the next run times them again).
    The keyword arguments this function took before the configs (``database``, ``precisions``,
    ``budget``, ``trials``, ...) are still read, with a ``DeprecationWarning``.

    Raises :class:`~ohq_tvm.errors.OHQError` subclasses: a config out of range, bad model or target, a
    precision the board lacks, a database that cannot be opened (found before a board is opened),
    unreachable board (with the measurements already stored kept).
    """
    configs = configs_from_keywords(
        "measure_model",
        old_keywords,
        {"measurement": measurement or MeasurementConfig(), "tuning": tuning or TuningConfig()},
        _RENAMED,
    )
    spec = resolve_target(target)
    imported = model if isinstance(model, ImportedModel) else load_onnx(model, input_shapes)
    with contextlib.ExitStack() as stack:
        if board is None:  # not started here: a bad database fails before a loopback board starts
            board = open_board(connection, spec)
            stack.callback(board.close)
        events = MeasureHooks(progress, on_plan, tuning_progress, say)
        return measure_on_board(
            imported, spec, board, configs["measurement"], configs["tuning"], timing, events
        )


@dataclass(frozen=True)
class MeasureHooks:
    """Where a measurement reports: per-operator events, the count to measure (``on_plan(total,
    to_measure)``), tuning progress, and one-line messages (``say``)."""

    progress: Callable[[MeasureEvent], None] | None = None
    on_plan: Callable[[int, int], None] | None = None
    tuning_progress: Callable[[TuningProgress], None] | None = None
    say: Callable[[str], None] | None = None

    @classmethod
    def of(cls, hooks: StageProgress) -> MeasureHooks:
        return cls(hooks.measured, hooks.measuring, hooks.tuning, hooks.say)


def measure_on_board(
    imported: ImportedModel,
    spec: BoardSpec,
    board: Board,
    measurement: MeasurementConfig,
    tuning: TuningConfig,
    timing: TimingConfig | None = None,
    hooks: MeasureHooks | None = None,
) -> ModelMeasurement:
    """:func:`measure_model` on resolved objects: ``imported`` on the open ``board`` (a board of kind
    ``spec``), left open. Raises as :func:`measure_model` does."""
    hooks = hooks or MeasureHooks()
    allowed = list(measurement.precisions if measurement.precisions is not None else spec.precisions)
    lacking = [p.value for p in allowed if p not in spec.precisions and p is not Precision.FP32]
    if lacking:
        have = ", ".join(p.value for p in spec.precisions)
        raise TargetError(f"board {spec.name} does not compute {', '.join(lacking)} (it has {have})")
    annotated = AnnotateCandidates(allowed, pin_first_last=measurement.pin_first_last)(imported.mod)
    workloads = extract_workloads(annotated)
    unique = workloads.unique()
    with LatencyDatabase(measurement.database) as db:  # a bad --db fails before the board is used
        tuned = None
        if tuning.trials:
            tuned = tune_candidates(
                imported, spec, board, allowed, tuning.trials, tuning.tuning_dir, hooks.tuning_progress
            )
        measurer = Measurer(
            board,
            spec,
            db,
            schedule=measurement.schedule,
            timing=timing,
            workers=measurement.workers,
            tuning=tuned,
        )
        budget = measurement.operator_budget
        if hooks.on_plan is not None:
            missing = len(db.missing(measurer.fingerprint, measurer.schedule, unique))
            hooks.on_plan(len(unique), missing if budget is None else min(missing, budget))
        started = time.time()
        summary = measurer.run(unique, hooks.progress, budget=budget)
        latencies = measurer.latencies(unique)
        path = str(db.path)
        in_model = None
        if measurement.whole_model and len(latencies) == len(unique):
            in_model = measured_scales(measurer, imported, workloads, hooks.say, measured_since=started)
            latencies.update(in_model.retimed_ms)  # parts that contradicted the whole, timed again
    return ModelMeasurement(imported, spec, workloads, latencies, summary, path, in_model)


class LatencySource(Protocol):
    """Where the planner's latencies come from: each candidate workload's latency and, when the uniform
    plans were timed whole, the in-model scales (:class:`ModelMeasurement`)."""

    def measure(self, imported: ImportedModel, hooks: StageProgress) -> ModelMeasurement:
        """The latencies of ``imported``'s candidate workloads; progress and messages go to ``hooks``."""
        ...


@dataclass
class BoardLatencySource:
    """The latencies measured on a board through OQA (:func:`measure_on_board`), stored in and reused
    from the measurement database."""

    spec: BoardSpec
    board: Board
    measurement: MeasurementConfig
    tuning: TuningConfig

    def measure(self, imported: ImportedModel, hooks: StageProgress) -> ModelMeasurement:
        if self.board.emulation is not None:
            hooks.say(
                f"warning: board {self.board.label} is emulated ({self.board.emulation}): the plan is chosen "
                "from emulated latencies, which are not the board's"
            )
        return measure_on_board(
            imported, self.spec, self.board, self.measurement, self.tuning, hooks=MeasureHooks.of(hooks)
        )


def tune_candidates(
    imported: ImportedModel,
    spec: BoardSpec,
    board: Board,
    precisions: Sequence[Precision],
    trials: int,
    tuning_dir: str | os.PathLike | None = None,
    progress: Callable[[TuningProgress], None] | None = None,
) -> TuningDatabase:
    """Tune the model once per candidate precision (all layers fp32, all int8, ...) with ``trials``
    shared between them, so the tuning database holds schedules for the operators OQA then times.

    A layer's workload compiles to the same fused TIR function as the layer inside the uniform model
    (same ops, same shapes; constants are parameters), so the records apply to it; the few that differ
    (a layer whose epilogue in the model includes a residual add) keep the default schedule. Integer
    variants are calibrated on synthetic data: the values do not change the kernels.
    """
    layers = quantizable_layers(imported.mod)
    calibration = (
        calibrate(imported, "minmax", num_samples=2) if any(p.is_integer for p in precisions) else None
    )
    variants = [imported.mod] + [
        ApplyPlan(Plan.uniform(layers, p), calibration if p.is_integer else None)(imported.mod)
        for p in precisions
        if p is not Precision.FP32
    ]
    share = max(1, trials // len(variants))
    result = None
    for mod in variants:
        result = tune_module(mod, spec, board, share, tuning_dir=tuning_dir, progress=progress)
    return result.database


__all__ = [
    "BoardLatencySource",
    "LatencySource",
    "MeasureHooks",
    "ModelMeasurement",
    "measure_model",
    "measure_on_board",
    "tune_candidates",
]
