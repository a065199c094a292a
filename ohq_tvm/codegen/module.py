"""Build a Relax module for a board and export it as a deployable shared library with a manifest."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import tvm
from tvm import relax

from .. import __version__
from ..errors import BuildError
from ..frontend import ImportedModel
from ..interrupts import reraise_interrupt
from ..jsonfile import make_output_folder, plain_json, write_atomic
from ..targets import BoardSpec
from .elf import elf_machine
from .schedules import cpu_pipeline
from .toolchain import Toolchain, find_toolchain, host_arch, triple_arch
from .tuned_build import tuned_cpu_pipeline
from .tuning_database import TuningDatabase, register_cpu_intrinsics, target_fingerprint, tuning_target

MANIFEST_FORMAT = "ohq-tvm/manifest"
MANIFEST_VERSION = 1


SCHEDULES = ("default", "none")


def build_executable(
    mod: tvm.IRModule,
    board: BoardSpec,
    schedule: str = "default",
    tuning: TuningDatabase | None = None,
) -> relax.Executable:
    """Compile ``mod`` for ``board``'s TVM target.

    ``schedule="default"`` gives every TIR function the zero-budget CPU schedule (parallel, vectorised);
    ``"none"`` is Relax's own pipeline, which leaves them as naive single-threaded loops (kept for
    comparison). With a ``tuning`` database (see :func:`~ohq_tvm.codegen.tune.tune_module`), functions it
    has records for get MetaSchedule's best schedule and the rest the default one. Raises
    :class:`BuildError` for a tuning database with ``schedule="none"`` or for another target, and with
    TVM's last message line when compilation fails.
    """
    lowered = lower_for_board(mod, board, schedule, tuning)
    try:
        return relax.build(lowered, board.tvm_target(), relax_pipeline=None)
    except Exception as err:  # TVM raises builtin types (RuntimeError, ValueError, TypeError, ...)
        reraise_interrupt()
        raise _build_error(board, err) from err


def lower_for_board(
    mod: tvm.IRModule,
    board: BoardSpec,
    schedule: str = "default",
    tuning: TuningDatabase | None = None,
) -> tvm.IRModule:
    """``mod`` after the Relax pipeline :func:`build_executable` compiles it with (fused, scheduled,
    lowered): ``main`` calls its TIR kernels directly, each a scheduled PrimFunc of the result. Same
    arguments and errors as :func:`build_executable`."""
    if schedule not in SCHEDULES:
        raise BuildError(f"unknown schedule {schedule!r}; use one of {', '.join(SCHEDULES)}")
    if tuning is not None and schedule != "default":
        raise BuildError(f"tuning records apply on top of the default schedule, not schedule {schedule!r}")
    target = board.tvm_target()
    if tuning is not None and target_fingerprint(tuning.target) != target_fingerprint(tuning_target(board)):
        raise BuildError(f"the tuning database {tuning.path} is for another target than {board.name}'s")
    try:
        if tuning is not None:
            register_cpu_intrinsics()  # records may replay tensorized schedules (VNNI, dot-product)
            return tuned_cpu_pipeline(tuning)(mod)
        if schedule == "default" and target.kind.name == "llvm":
            return cpu_pipeline(target)(mod)
        with target:
            return relax.get_pipeline("default")(mod)
    except Exception as err:  # TVM raises builtin types (RuntimeError, ValueError, TypeError, ...)
        reraise_interrupt()
        raise _build_error(board, err) from err


def _build_error(board: BoardSpec, err: Exception) -> BuildError:
    lines = str(err).strip().splitlines()
    return BuildError(f"building for {board.name} failed: {lines[-1] if lines else err!r}")


@dataclass
class ExportedModule:
    """A library on disk, with the toolchain that linked it and its manifest."""

    library_path: Path
    manifest_path: Path
    toolchain: Toolchain
    manifest: dict = field(default_factory=dict)

    def write_manifest(self) -> None:
        text = json.dumps(self.manifest, indent=2, sort_keys=False) + "\n"
        write_atomic(self.manifest_path, text, "manifest", error=BuildError)


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def export_module(
    executable: relax.Executable,
    out_dir: str | os.PathLike,
    board: BoardSpec,
    imported: ImportedModel,
    *,
    toolchain: Toolchain | None = None,
    library_name: str = "model.so",
    schedule: str = "default",
) -> ExportedModule:
    """Write ``out_dir/model.so`` linked for the board's triple and ``out_dir/manifest.json``.

    The manifest records the target, inputs/outputs, TVM version, the toolchain and the SHA-256 of both
    the source model and the library; each file is written whole or not at all. Raises
    :class:`BuildError` if no toolchain links for the triple, or if ``out_dir`` (created if missing) or
    its files cannot be written.
    """
    out = make_output_folder(out_dir, BuildError)
    toolchain = toolchain or find_toolchain(board.cross_triple)
    library_path = out / library_name
    started = time.perf_counter()
    # Linked in a private folder, checked, then renamed over the old library: a failed export leaves the
    # previous one whole, and a symlink at library_path is replaced, not written through.
    staging = Path(tempfile.mkdtemp(prefix=".export-", dir=out))
    try:
        staged = staging / library_name
        try:
            executable.export_library(str(staged), fcompile=toolchain.fcompile())
        except BuildError:
            raise
        except Exception as err:
            raise BuildError(f"exporting {library_path} for {board.name} failed: {err}") from err
        machine = elf_machine(staged)
        expected = triple_arch(board.cross_triple) if board.cross_triple else host_arch()
        if machine != expected:
            raise BuildError(
                f"{library_path} was linked for {machine}, but {board.name} needs {expected}; "
                f"check the toolchain ({toolchain.describe()})"
            )
        try:
            os.replace(staged, library_path)
        except OSError as err:
            raise BuildError(f"cannot write {library_path}: {err.strerror or err}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    manifest = {
        "format": MANIFEST_FORMAT,
        "format_version": MANIFEST_VERSION,
        "model": {"source": imported.source, "sha256": imported.sha256},
        "board": board.to_json(),
        "tvm_target": dict(board.tvm_target().export()),
        "inputs": [spec.to_json() for spec in imported.inputs],
        "outputs": [spec.to_json() for spec in imported.outputs],
        "library": {
            "file": library_name,
            "sha256": sha256_file(library_path),
            "bytes": library_path.stat().st_size,
            "elf_machine": machine,
            "toolchain": toolchain.to_json(),
            "export_s": round(time.perf_counter() - started, 3),
        },
        "precision": "fp32",
        "schedule": schedule,
        "versions": {
            "ohq_tvm": __version__,
            "tvm": tvm.__version__,
            "python": platform.python_version(),
        },
        "built_on": platform.node(),
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "verification": None,
    }
    exported = ExportedModule(library_path, out / "manifest.json", toolchain, plain_json(manifest))
    exported.write_manifest()
    return exported
