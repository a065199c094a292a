"""The Python API: ``compile_model`` runs the pipeline the ``ohq-tvm compile`` command runs.

Stages: import ONNX → [plan: calibrate, rewrite with ``ApplyPlan``, export the QDQ twin] → build for the
target → export (cross-linked for the board's triple) → run on the board over RPC and compare with ONNX
Runtime (on the QDQ export when the plan quantizes). Measurement, estimation and the solver slot in before
the rewrite.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from .board import Board, open_board
from .build import (
    FP32_TOLERANCE,
    QUANTIZED_TOLERANCE,
    ExportedModule,
    TuneResult,
    TuningProgress,
    Verification,
    build_executable,
    export_module,
    find_toolchain,
    host_arch,
    triple_arch,
    tune_module,
    verify_on_board,
)
from .calibration import Calibration, calibrate, load_samples
from .errors import BoardError, TuningError, VerificationError
from .frontend import ImportedModel, load_onnx
from .plan import Plan, PlanError
from .precision import Precision
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

    @property
    def verified(self) -> bool:
        return self.verification is not None and self.verification.passed


def _can_run_locally(board: BoardSpec) -> bool:
    triple = board.cross_triple or board.target_config.get("mtriple")
    return triple is None or triple_arch(str(triple)) == host_arch()


def compile_model(
    model: str | os.PathLike | onnx.ModelProto,
    target: str | BoardSpec = "host",
    out_dir: str | os.PathLike = "ohq-out",
    *,
    tracker: str | None = None,
    key: str | None = None,
    server: str | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    verify: bool = True,
    seed: int = 0,
    schedule: str = "default",
    precision: Precision | str | None = None,
    plan: Plan | str | os.PathLike | None = None,
    calibration_method: str = "minmax",
    calibration_samples: str | os.PathLike | None = None,
    normalization: str = "imagenet",
    synthetic: str = "gaussian",
    trials: int = 0,
    tuning_dir: str | os.PathLike | None = None,
    progress: Progress | None = None,
    tuning_progress: Callable[[TuningProgress], None] | None = None,
) -> CompileResult:
    """Compile an ONNX model for a board and check it there.

    Args:
        model: path to an ``.onnx`` file or an ``onnx.ModelProto``.
        target: a board name, a board TOML path, a target triple, TVM target JSON, or a ``BoardSpec``.
        out_dir: receives ``model.so`` and ``manifest.json``.
        tracker/key/server: where the board is (``host:port``); neither → the loopback host board.
        input_shapes: static shapes for inputs with dynamic dimensions.
        verify: run on the board and compare with ONNX Runtime (skipped, with the reason recorded, when
            the target's architecture differs from this machine's and no tracker/server is given).
        schedule: ``"default"`` (zero-budget parallel/vectorised CPU schedule) or ``"none"``.
        precision: every layer in this precision (a uniform plan); or
        plan: a :class:`Plan` or the path of its JSON. With either, integer layers are calibrated with
            ``calibration_method`` on ``calibration_samples`` (a folder of ``.npy``/images, normalised
            per ``normalization``) or, without samples, on ``synthetic`` data (``gaussian``, ``uniform``,
            or ``matched`` to the first layer's BatchNormalization statistics); ``plan.json``,
            ``calibration.json`` and ``model.qdq.onnx`` are written next to the module.
        trials: MetaSchedule budget (0: none, the zero-budget default schedule only). With trials, every
            fused function without a record in the target's tuning database is tuned on the board
            (measured through its RPC tracker; the loopback host board by default) and the module is
            built with the database's schedules, the default schedule covering the rest.
        tuning_dir: root of the tuning databases (default: ``$OHQ_TVM_TUNING_DIR`` or
            ``~/.cache/ohq-tvm/tuning``).
        progress: called with one-line messages as stages finish;
        tuning_progress: called with a :class:`TuningProgress` after each measured batch of candidates.

    Returns a :class:`CompileResult`. Raises :class:`~ohq_tvm.errors.OHQError` subclasses for bad input,
    unreachable boards (also when candidates must be measured on a board of another architecture and no
    tracker is given), tuning and build failures, and :class:`VerificationError` (after writing the
    outputs and a manifest marked as failed) when the board's outputs disagree with ONNX Runtime.
    """
    say = progress or (lambda _message: None)
    seconds: dict[str, float] = {}

    def stage(name: str, started: float) -> None:
        seconds[name] = round(time.perf_counter() - started, 3)

    board = target if isinstance(target, BoardSpec) else resolve_target(target)
    started = time.perf_counter()
    imported = load_onnx(model, input_shapes)
    stage("import", started)
    say(f"imported {imported.source}: {len(imported.inputs)} input(s), {len(imported.outputs)} output(s)")

    toolchain = find_toolchain(board.cross_triple)  # fail early, before the slow build
    mod, chosen, calibration, qdq, qdq_path = imported.mod, None, None, None, None
    if precision is not None or plan is not None:
        started = time.perf_counter()
        mod, chosen, calibration, qdq, qdq_path = _apply_plan(
            imported,
            board,
            Path(out_dir),
            precision=precision,
            plan=plan,
            method=calibration_method,
            samples_path=calibration_samples,
            normalization=normalization,
            synthetic=synthetic,
            seed=seed,
            say=say,
        )
        stage("plan", started)
    quantized = chosen is not None and any(p is not Precision.FP32 for p in chosen.assignments.values())
    remote_given = bool(tracker or server)
    runs_here = remote_given or _can_run_locally(board)
    live = open_board(tracker, key, server, default_key=board.rpc_key) if runs_here else _NoBoard(board)
    try:  # the board (a loopback one starts on first use) serves both tuning and verification
        tuned = None
        if trials:
            if schedule != "default":
                raise TuningError(f"--trials tunes on top of the default schedule, not schedule {schedule!r}")
            started = time.perf_counter()
            tuned = tune_module(mod, board, live, trials, tuning_dir=tuning_dir, progress=tuning_progress)
            stage("tune", started)
            untuned = sum(1 for task in tuned.tasks if task.best_ms is None)
            say(
                f"tuned: {tuned.trials_measured} trials measured ({tuned.trials_failed} failed), "
                f"{tuned.tasks_reused} of {len(tuned.tasks)} tasks from the database {tuned.database_path}"
                + (f"; {untuned} without a record keep the default schedule" if untuned else "")
            )
        started = time.perf_counter()
        executable = build_executable(mod, board, schedule, tuned.database if tuned else None)
        stage("build", started)
        say(f"built for {board.name} ({board.target_config.get('mtriple', 'native')})")

        started = time.perf_counter()
        exported = export_module(executable, out_dir, board, imported, toolchain=toolchain, schedule=schedule)
        stage("export", started)
        say(f"exported {exported.library_path} with {toolchain.describe()}")

        result = CompileResult(
            out_dir=Path(out_dir),
            library_path=exported.library_path,
            manifest_path=exported.manifest_path,
            board=board,
            imported=imported,
            verification=None,
            stage_seconds=seconds,
            plan=chosen,
            calibration=calibration,
            qdq_path=qdq_path,
            tuning=tuned,
        )
        if not verify:
            result.skipped_verification = "verification disabled"
        elif not runs_here:
            result.skipped_verification = (
                f"no {board.name} board connected (this machine is {host_arch()}); "
                f"pass --tracker HOST:PORT --key {board.rpc_key} to verify on the board"
            )
        else:
            started = time.perf_counter()
            say(f"running on board {live.label}")
            result.verification = _verify(live, exported, imported, seed, qdq if quantized else None)
            stage("verify", started)
            say(result.verification.summary())
    finally:
        live.close()
    if tuned is not None:
        exported.manifest["tuning"] = {"trials": trials, **tuned.to_json()}
    exported.manifest["verification"] = (
        result.verification.to_json() if result.verification else {"skipped": result.skipped_verification}
    )
    exported.manifest["stage_seconds"] = seconds
    if chosen is not None:
        exported.manifest["plan"] = {"counts": chosen.counts(), "file": "plan.json", "qdq": "model.qdq.onnx"}
    exported.write_manifest()
    if result.verification is not None and not result.verification.passed:
        raise VerificationError(
            f"{exported.library_path} {result.verification.summary()}; not shipped as verified "
            f"(see {exported.manifest_path})"
        )
    return result


class _NoBoard(Board):
    """Stands in for a board of another architecture when no tracker is given: tuning that finds every
    task in the database never asks for it; anything that does gets an error naming the fix."""

    def __init__(self, spec: BoardSpec) -> None:
        self.label = f"{spec.name} (not connected)"
        self._fix = (
            f"no {spec.name} board connected (this machine is {host_arch()}); candidates must be measured "
            f"on the board: pass --tracker HOST:PORT --key {spec.rpc_key}"
        )

    def connect(self, session_timeout_s: float = 0):
        raise BoardError(self._fix)

    def rpc_tracker(self) -> tuple[str, int, str]:
        raise BoardError(self._fix)


def _apply_plan(
    imported: ImportedModel,
    board: BoardSpec,
    out_dir: Path,
    *,
    precision: Precision | str | None,
    plan: Plan | str | os.PathLike | None,
    method: str,
    samples_path: str | os.PathLike | None,
    normalization: str,
    synthetic: str,
    seed: int,
    say: Progress,
):
    """Make or load the plan, calibrate what it quantizes, rewrite, and write plan/calibration/QDQ files."""
    from .layers import quantizable_layers
    from .passes import AnnotateCandidates, ApplyPlan, candidates
    from .qdq import export_qdq

    layers = quantizable_layers(imported.mod)
    if plan is not None and precision is not None:
        raise PlanError("give a precision or a plan, not both")
    if plan is not None:
        chosen = plan if isinstance(plan, Plan) else Plan.load(plan)
        if chosen.model_sha256 and chosen.model_sha256 != imported.sha256:
            raise PlanError(
                f"the plan was made for another model (sha256 {chosen.model_sha256[:12]}…, "
                f"this one is {imported.sha256[:12]}…)"
            )
    else:
        chosen = Plan.uniform(layers, precision, model_sha256=imported.sha256, target=board.name)
    annotated = AnnotateCandidates(board, pin_first_last=False)(imported.mod)
    chosen.validate_against(layers, candidates(annotated))
    calibration = None
    if any(p.is_integer for p in chosen.assignments.values()):
        samples = load_samples(samples_path, imported.inputs, normalization) if samples_path else None
        calibration = calibrate(imported, method, samples=samples, synthetic=synthetic, seed=seed)
        chosen.calibration = method
        say(f"calibrated {len(calibration.ranges)} layer inputs ({method}, {calibration.source})")
    mod = ApplyPlan(chosen, calibration)(annotated)
    chosen.save(out_dir / "plan.json")
    if calibration is not None:
        calibration.save(out_dir / "calibration.json")
    qdq_path = out_dir / "model.qdq.onnx"
    qdq = export_qdq(imported, chosen, calibration, qdq_path)
    counts = ", ".join(f"{n} {p}" for p, n in chosen.counts().items())
    say(f"applied plan: {counts}")
    return mod, chosen, calibration, qdq, qdq_path


def _verify(
    board: Board,
    exported: ExportedModule,
    imported: ImportedModel,
    seed: int,
    reference: onnx.ModelProto | None = None,
) -> Verification:
    session = board.connect()
    tolerance = FP32_TOLERANCE if reference is None else QUANTIZED_TOLERANCE
    return verify_on_board(
        session, exported.library_path, imported, seed=seed, tolerance=tolerance, reference=reference
    )
