"""The Python API: ``compile_model`` runs the pipeline the ``ohq-tvm compile`` command runs.

Stages: import ONNX → build for the target → export (cross-linked for the board's triple) → run on the board
over RPC and compare with ONNX Runtime. Later stages (annotate, measure, estimate, solve, rewrite) slot in
between import and build.
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
    ExportedModule,
    Verification,
    build_executable,
    export_module,
    find_toolchain,
    host_arch,
    triple_arch,
    verify_on_board,
)
from .errors import VerificationError
from .frontend import ImportedModel, load_onnx
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
    progress: Progress | None = None,
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

    Returns a :class:`CompileResult`. Raises :class:`~ohq_tvm.errors.OHQError` subclasses for bad input,
    unreachable boards and build failures, and :class:`VerificationError` (after writing the outputs and
    a manifest marked as failed) when the board's outputs disagree with ONNX Runtime.
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
    started = time.perf_counter()
    executable = build_executable(imported.mod, board, schedule)
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
    )
    remote_given = bool(tracker or server)
    if not verify:
        result.skipped_verification = "verification disabled"
    elif not remote_given and not _can_run_locally(board):
        result.skipped_verification = (
            f"no {board.name} board connected (this machine is {host_arch()}); "
            f"pass --tracker HOST:PORT --key {board.rpc_key} to verify on the board"
        )
    else:
        started = time.perf_counter()
        with open_board(tracker, key, server, default_key=board.rpc_key) as live:
            say(f"running on board {live.label}")
            result.verification = _verify(live, exported, imported, seed)
        stage("verify", started)
        say(result.verification.summary())
    exported.manifest["verification"] = (
        result.verification.to_json() if result.verification else {"skipped": result.skipped_verification}
    )
    exported.manifest["stage_seconds"] = seconds
    exported.write_manifest()
    if result.verification is not None and not result.verification.passed:
        raise VerificationError(
            f"{exported.library_path} {result.verification.summary()}; not shipped as verified "
            f"(see {exported.manifest_path})"
        )
    return result


def _verify(board: Board, exported: ExportedModule, imported: ImportedModel, seed: int) -> Verification:
    session = board.connect()
    return verify_on_board(session, exported.library_path, imported, seed=seed)
