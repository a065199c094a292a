"""The Python API: ``compile_model`` runs the pipeline the ``ohq-tvm compile`` command runs.

Stages: import ONNX → [with a budget: measure every candidate operator on the board (OQA), estimate
sensitivity (MQE), solve (ILP) — :func:`ohq_tvm.planner.plan_model`] → [with a plan: calibrate, rewrite
with ``ApplyPlan``, export the QDQ twin — :mod:`ohq_tvm.rewrite`] → tune (with trials) → build for the
target → export (cross-linked for the board's triple) → run on the board over RPC: compare with ONNX
Runtime (on the QDQ export when the plan quantizes), time it, and measure fidelity to float32 →
manifest, and after planning the report and Pareto plot.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import onnx

from .board import NOT_THE_BOARDS, Board, BoardConnection, open_board
from .calibration import Calibration
from .codegen import (
    FP32_TOLERANCE,
    QUANTIZED_TOLERANCE,
    ExportedModule,
    TuneResult,
    Verification,
    build_executable,
    export_module,
    find_toolchain,
    host_arch,
    triple_arch,
    tune_module,
    verify_vm,
)
from .codegen.fidelity import Fidelity, agreement_failure, check_fidelity, describe
from .config import CalibrationConfig, PlanningConfig, TuningConfig, VerificationConfig, configs_from_keywords
from .errors import BoardError, PlanError, TuningError, VerificationError
from .frontend import ImportedModel, load_onnx
from .interrupts import reraise_interrupt
from .jsonfile import make_output_folder, write_json
from .plan import Plan
from .planner import PlanningResult, default_sensitivity_cache, plan_model
from .precision import Precision
from .progress import StageProgress, as_progress
from .report import plot_pareto, write_report
from .rewrite import rewrite_for_plan
from .targets import BoardSpec, resolve_target

Progress = Callable[[str], None]


@dataclass
class CompileResult:
    """What ``compile_model`` produced: files, the board it ran on, and how it compared."""

    out_dir: Path
    library_path: Path
    manifest_path: Path
    board: BoardSpec
    imported: ImportedModel
    verification: Verification | None
    skipped_verification: str | None = None
    stage_seconds: dict[str, float] = field(default_factory=dict)
    plan: Plan | None = None
    calibration: Calibration | None = None
    qdq_path: Path | None = None
    tuning: TuneResult | None = None
    planning: PlanningResult | None = None
    fidelity: dict[str, Fidelity] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)  # why verification failed, if it did
    report_path: Path | None = None
    pareto_path: Path | None = None
    emulation: str | None = None  # what emulated the board it ran on: its latencies are not the board's

    @property
    def verified(self) -> bool:
        return self.verification is not None and self.verification.passed and not self.failures

    @property
    def timing_unreliable(self) -> str | None:
        """Why the board's timings the plan was chosen from contradict each other (None: they agree, or
        nothing was planned)."""
        return self.planning.timing_unreliable if self.planning is not None else None

    @property
    def measured_ms(self) -> float | None:
        """The built module's median latency on the board, if it ran there."""
        latency = self.verification.latency if self.verification is not None else None
        return latency.median_ms if latency is not None else None


def _can_run_locally(board: BoardSpec) -> bool:
    triple = board.cross_triple or board.target_config.get("mtriple")
    return triple is None or triple_arch(str(triple)) == host_arch()


# The keyword arguments compile_model took before its configs, where the field has another name: old -> new.
_RENAMED = {"calibration_method": "method", "calibration_samples": "samples"}


def compile_model(
    model: str | os.PathLike | onnx.ModelProto,
    target: str | BoardSpec = "host",
    out_dir: str | os.PathLike = "ohq-out",
    *,
    connection: BoardConnection | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    precision: Precision | str | None = None,
    plan: Plan | str | os.PathLike | None = None,
    planning: PlanningConfig | None = None,
    calibration: CalibrationConfig | None = None,
    verification: VerificationConfig | None = None,
    tuning: TuningConfig | None = None,
    schedule: str = "default",
    seed: int = 0,
    progress: StageProgress | Callable[[str], None] | None = None,
    **old_keywords,
) -> CompileResult:
    """Compile an ONNX model for a board and check it there.

    Args:
        model: path to an ``.onnx`` file or an ``onnx.ModelProto``.
        target: a board name, a board TOML path, a target triple, TVM target JSON, or a ``BoardSpec``.
        out_dir: receives ``model.so`` and ``manifest.json``.
        connection: where the board is (a :class:`~ohq_tvm.board.BoardConnection`: tracker, server or
            emulated); none → the loopback host board.
        input_shapes: static shapes for inputs with dynamic dimensions.
        precision: every layer in this precision (a uniform plan); or
        plan: a :class:`Plan` or the path of its JSON; or
        planning: run the whole OHQ pipeline (a :class:`~ohq_tvm.config.PlanningConfig`): every
            candidate operator timed on the board (OQA, into its ``database``), MQE sensitivity (cached
            next to the database), the ILP under its ``budget`` (none: the least-loss plan). Writes
            ``report.md``, ``pareto.png``, ``frontier.json`` and ``sensitivity.json`` too.
            With a precision, plan or planning, integer layers are calibrated as ``calibration`` says
            (a :class:`~ohq_tvm.config.CalibrationConfig`; default: minmax on synthetic Gaussian data);
            ``plan.json``, ``calibration.json`` and ``model.qdq.onnx`` are written next to the module.
        verification: what is checked on the board (a :class:`~ohq_tvm.config.VerificationConfig`;
            default: run and compare with ONNX Runtime, and a quantized module's fidelity to float32 on
            8 synthetic batches). Verification is skipped, with the reason recorded, when the target's
            architecture differs from this machine's and the connection names no board.
        tuning: MetaSchedule (a :class:`~ohq_tvm.config.TuningConfig`; default: no tuning, the
            zero-budget default schedule only). With trials, every fused function without a record in
            the target's tuning database is tuned on the board (measured through its RPC tracker; the
            loopback host board by default) and the module is built with the database's schedules, the
            default schedule covering the rest. With planning, the candidate operators are tuned (and
            timed as tuned builds) before planning, too.
        schedule: ``"default"`` (zero-budget parallel/vectorised CPU schedule) or ``"none"``.
        seed: of the synthetic verification, fidelity and calibration inputs.
        progress: a :class:`~ohq_tvm.progress.StageProgress` (bars for the long stages) or a callback
            for one-line stage messages.

    The flat keyword arguments this function took before the configs (``budget``, ``database``,
    ``precisions``, ``mqe_batches``, ``mqe_data``, ``whole_model``, ``calibration_method``,
    ``calibration_samples``, ``normalization``, ``synthetic``, ``verify``, ``eval_images``,
    ``fidelity_samples``, ``min_agreement``, ``trials``, ``tuning_dir``) are still read, with a
    ``DeprecationWarning``; without ``budget`` the planning ones are ignored, as they were.

    Returns a :class:`CompileResult`. Raises :class:`~ohq_tvm.errors.OHQError` subclasses for bad input
    (an ``out_dir`` that is a file or cannot be made or written is one, found before any slow stage),
    unreachable boards (also when candidates must be measured on a board of another architecture and no
    tracker is given), tuning and build failures, and :class:`VerificationError` (after writing the
    outputs, the report and a manifest marked as failed) when the board's outputs disagree with ONNX
    Runtime or fall below ``min_agreement``. An interrupted run keeps every operator measured, the
    sensitivity estimate and the tuning records: rerunning resumes from them.
    """
    configs = configs_from_keywords(
        "compile_model",
        old_keywords,
        {
            "planning": planning or PlanningConfig(),
            "calibration": calibration or CalibrationConfig(),
            "verification": verification or VerificationConfig(),
            "tuning": tuning or TuningConfig(),
        },
        _RENAMED,
    )
    if planning is None and old_keywords.get("budget") is None:
        configs["planning"] = None  # no budget, no planning: as the flat keywords meant
    return _compile(
        model,
        resolve_target(target),
        Path(out_dir),
        connection or BoardConnection(),
        input_shapes,
        Precision.parse(str(precision)) if precision is not None else None,
        plan,
        schedule,
        seed,
        as_progress(progress),
        **configs,
    )


def _compile(
    model: str | os.PathLike | onnx.ModelProto,
    spec: BoardSpec,
    out: Path,
    connection: BoardConnection,
    input_shapes: Mapping[str, Sequence[int]] | None,
    precision: Precision | None,
    plan: Plan | str | os.PathLike | None,
    schedule: str,
    seed: int,
    hooks: StageProgress,
    planning: PlanningConfig | None,
    calibration: CalibrationConfig,
    verification: VerificationConfig,
    tuning: TuningConfig,
) -> CompileResult:
    """:func:`compile_model` on resolved objects."""
    say = hooks.say
    seconds: dict[str, float] = {}

    def stage(name: str, started: float) -> None:
        seconds[name] = round(time.perf_counter() - started, 3)
        reraise_interrupt()  # one swallowed by a finalizer (see oqa.measure) stops the run here

    wanted = planning.budget if planning is not None else None
    if sum(x is not None for x in (precision, plan, planning)) > 1:
        raise PlanError("give one of a precision, a plan or a budget")
    if plan is not None and not isinstance(plan, Plan):
        plan = Plan.load(plan)  # an unreadable plan file fails here, before any folder is made
    started = time.perf_counter()
    imported = load_onnx(model, input_shapes)
    stage("import", started)
    say(f"imported {imported.source}: {len(imported.inputs)} input(s), {len(imported.outputs)} output(s)")
    for note in imported.notes:
        say(note)

    toolchain = find_toolchain(spec.cross_triple)  # fail early, before the slow build
    make_output_folder(out)  # likewise: a file in its place or no permission, before any measurement
    runs_here = connection.remote or _can_run_locally(spec)
    # One board serves measurement, MQE, tuning and verification (a loopback one starts on first use).
    board = open_board(connection, spec) if runs_here else _NoBoard(spec)
    try:
        planned = None
        if planning is not None:
            if not runs_here:
                raise BoardError(board.fix)
            started = time.perf_counter()
            asked = replace(
                planning,
                frontier_points=max(planning.frontier_points, FRONTIER_POINTS),
                sensitivity_cache=planning.sensitivity_cache
                or default_sensitivity_cache(planning.database, imported),
            )
            planned = plan_model(imported, spec, planning=asked, tuning=tuning, progress=hooks, board=board)
            plan = planned.plan
            stage("plan", started)
            say(f"chosen plan: {_describe(plan)} (budget {wanted})")
        rewritten = None
        if precision is not None or plan is not None:
            started = time.perf_counter()
            rewritten = rewrite_for_plan(
                imported,
                spec,
                out,
                calibration,
                precision=precision,
                plan=plan,
                seed=seed,
                say=say,
            )
            stage("rewrite", started)
        mod = rewritten.mod if rewritten is not None else imported.mod
        quantized = rewritten is not None and rewritten.quantized
        tuned = None
        if tuning.trials:
            if schedule != "default":
                raise TuningError(f"--trials tunes on top of the default schedule, not schedule {schedule!r}")
            started = time.perf_counter()
            tuned = tune_module(
                mod, spec, board, tuning.trials, tuning_dir=tuning.tuning_dir, progress=hooks.tuning
            )
            stage("tune", started)
            untuned = sum(1 for task in tuned.tasks if task.best_ms is None)
            say(
                f"tuned: {tuned.trials_measured} trials measured ({tuned.trials_failed} failed), "
                f"{tuned.tasks_reused} of {len(tuned.tasks)} tasks from the database {tuned.database_path}"
                + (f"; {untuned} without a record keep the default schedule" if untuned else "")
            )
        started = time.perf_counter()
        executable = build_executable(mod, spec, schedule, tuned.database if tuned else None)
        stage("build", started)
        say(f"built for {spec.name} ({spec.target_config.get('mtriple', 'native')})")

        started = time.perf_counter()
        exported = export_module(executable, out, spec, imported, toolchain=toolchain, schedule=schedule)
        stage("export", started)
        say(f"exported {exported.library_path} with {toolchain.describe()}")

        result = CompileResult(
            out_dir=out,
            library_path=exported.library_path,
            manifest_path=exported.manifest_path,
            board=spec,
            imported=imported,
            verification=None,
            stage_seconds=seconds,
            plan=rewritten.plan if rewritten else None,
            calibration=rewritten.calibration if rewritten else None,
            qdq_path=rewritten.qdq_path if rewritten else None,
            tuning=tuned,
            planning=planned,
            emulation=board.emulation,
        )
        if not verification.verify:
            result.skipped_verification = "verification disabled"
        elif not runs_here:
            result.skipped_verification = (
                f"no {spec.name} board connected (this machine is {host_arch()}); "
                f"pass --tracker HOST:PORT --key {spec.rpc_key} to verify on the board, or --emulated"
            )
        else:
            started = time.perf_counter()
            say(f"running on board {board.label}")
            vm = board.connect().load_vm(exported.library_path)
            reference = rewritten.qdq if quantized else None
            tolerance = QUANTIZED_TOLERANCE if quantized else FP32_TOLERANCE
            result.verification = verify_vm(vm, imported, seed=seed, tolerance=tolerance, reference=reference)
            say(result.verification.summary())
            if not result.verification.passed:
                result.failures.append(result.verification.summary())
            if quantized:
                result.fidelity = check_fidelity(
                    vm,
                    imported,
                    samples=verification.fidelity_samples,
                    eval_images=verification.eval_images,
                    normalization=calibration.normalization,
                    seed=seed,
                )
                say("fidelity to fp32: " + "; ".join(describe(f) for f in result.fidelity.values()))
                failure = agreement_failure(result.fidelity, verification.min_agreement)
                if failure:
                    result.failures.append(failure)
            stage("verify", started)
    finally:
        board.close()
    _finish(result, exported, wanted, tuning.trials, say)
    if result.failures:
        raise VerificationError(
            f"{exported.library_path}: {'; '.join(result.failures)}; not shipped as verified "
            f"(see {exported.manifest_path})"
        )
    return result


# Budgets swept for the frontier drawn in pareto.png when the budget does not ask for more.
FRONTIER_POINTS = 8


def _describe(plan: Plan) -> str:
    counts = plan.counts_text()
    predicted = plan.predicted.get("latency_ms")
    return counts + (f", predicted {predicted:.3f} ms" if predicted is not None else "")


def _finish(result: CompileResult, exported: ExportedModule, wanted, trials: int, say: Progress) -> None:
    """Write the manifest (and, after planning, the frontier, the report and the Pareto plot)."""
    manifest = exported.manifest
    if result.tuning is not None:
        manifest["tuning"] = {"trials": trials, **result.tuning.to_json()}
    if result.verification is not None:
        manifest["verification"] = {**result.verification.to_json(), "failures": result.failures}
        if result.emulation is not None:
            manifest["verification"]["emulated"] = {"by": result.emulation, "note": NOT_THE_BOARDS}
    else:
        manifest["verification"] = {"skipped": result.skipped_verification}
    if result.fidelity:
        manifest["fidelity"] = {name: f.to_json() for name, f in result.fidelity.items()}
    manifest["stage_seconds"] = result.stage_seconds
    if result.plan is not None:
        manifest["plan"] = {"counts": result.plan.counts(), "file": "plan.json", "qdq": "model.qdq.onnx"}
    planning = result.planning
    if planning is not None:
        out = result.out_dir
        in_model = planning.measurement.in_model
        write_json(out / "frontier.json", [p.to_json() for p in planning.frontier], "frontier")
        planning.sensitivity.save(out / "sensitivity.json")
        verdict = result.verification.summary() if result.verification else result.skipped_verification
        others = [f for f in result.failures if result.verification is None or f != verdict]
        verdict = "; ".join([str(verdict), *(f"FAILED: {f}" for f in others)])
        result.report_path = write_report(
            out / "report.md",
            planning,
            model_label=str(result.imported.source),
            board_label=_board_label(result),
            budget=str(wanted),
            measured_ms=result.measured_ms,
            measured_latency=manifest["verification"].get("latency"),
            fidelity=manifest.get("fidelity"),
            verification=verdict,
            stage_seconds=result.stage_seconds,
        )
        result.pareto_path = plot_pareto(
            out / "pareto.png",
            planning,
            measured_ms=result.measured_ms,
            title=Path(str(result.imported.source)).name,
        )
        manifest["planning"] = {
            "budget": str(wanted),
            "budgets": {k: v for k, v in vars(planning.budgets).items() if v is not None},
            "predicted": planning.plan.predicted,
            "measured_ms": result.measured_ms,
            "measurement_database": planning.measurement.database_path,
            "operators_measured": planning.measurement.summary.measured,
            "operators_reused": planning.measurement.summary.reused,
            "sensitivity_reused": planning.sensitivity_reused,
            "in_model": in_model.to_json() if in_model is not None else None,
            "timing_check": in_model.check_json() if in_model is not None else None,
            "timing_unreliable": planning.timing_unreliable,
            "files": ["report.md", "pareto.png", "frontier.json", "sensitivity.json"],
        }
        say(f"wrote {result.report_path} and {result.pareto_path}")
    exported.write_manifest()


def _board_label(result: CompileResult) -> str:
    label = result.verification.board if result.verification else result.board.name
    return f"{label} ({NOT_THE_BOARDS})" if result.emulation else label


class _NoBoard(Board):
    """Stands in for a board of another architecture when no tracker is given: tuning that finds every
    task in the database never asks for it; anything that does gets an error naming the fix."""

    def __init__(self, spec: BoardSpec) -> None:
        self.label = f"{spec.name} (not connected)"
        self.fix = (
            f"no {spec.name} board connected (this machine is {host_arch()}); candidates must be measured "
            f"on the board: pass --tracker HOST:PORT --key {spec.rpc_key} (or --emulated, whose latencies "
            "are not the board's)"
        )

    def connect(self, session_timeout_s: float = 0):
        raise BoardError(self.fix)

    def rpc_tracker(self) -> tuple[str, int, str]:
        raise BoardError(self.fix)
