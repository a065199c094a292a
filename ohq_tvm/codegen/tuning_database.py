"""Where MetaSchedule tuning records live: one JSON database per TVM target, shared by every model.

A directory per target, named after a stable hash of the target (``llvm-znver4-<hash>``), under the root
``$OHQ_TVM_TUNING_DIR`` or ``$XDG_CACHE_HOME/ohq-tvm/tuning`` (``~/.cache`` by default), or a root the caller
names. Inside: MetaSchedule's ``database_workload.json`` / ``database_tuning_record.json`` and ``target.json``
(which target the records are for, for people). Records are keyed by the structure of each fused TIR
function, so a conv2d tuned in one model is reused by every model that has the same conv2d.

``confirmed/`` holds, per workload, the schedule a build uses: the fastest of the search's best records
re-timed side by side after the search (see :func:`~ohq_tvm.codegen.tune.tune_module`). Builds look there
first and fall back to the search's best record for workloads tuned before it existed.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import re
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import tvm
from tvm.s_tir import meta_schedule as ms
from tvm.target import Target

from ..errors import TuningError
from ..jsonfile import plain_json
from ..kernels.isa import register_intrinsics
from ..targets import BoardSpec

TUNING_DIR_ENV = "OHQ_TVM_TUNING_DIR"
_FINGERPRINT_CHARS = 12


def default_tuning_root() -> Path:
    """``$OHQ_TVM_TUNING_DIR``, else ``$XDG_CACHE_HOME/ohq-tvm/tuning`` (``~/.cache`` by default)."""
    explicit = os.environ.get(TUNING_DIR_ENV)
    if explicit:
        return Path(explicit)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "ohq-tvm" / "tuning"


def tuning_target(board: BoardSpec) -> Target:
    """The board's TVM target with ``num-cores`` set (MetaSchedule refuses a CPU target without it)."""
    config = dict(board.target_config)
    config.setdefault("num-cores", board.num_cores)
    try:
        return Target(config)
    except Exception as err:  # TVM raises builtin types with its own message
        raise TuningError(f"board {board.name}: TVM rejects its tuning target: {err}") from None


def target_fingerprint(target: Target) -> str:
    """A stable hash of everything in the target (kind, CPU, triple, features, cores)."""
    canonical = json.dumps(plain_json(target.export()), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:_FINGERPRINT_CHARS]


def _directory_name(target: Target) -> str:
    attrs = target.attrs
    cpu = str(attrs.get("mcpu") or attrs.get("mtriple") or "generic")
    readable = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{target.kind.name}-{cpu}")
    return f"{readable}-{target_fingerprint(target)}"


def register_cpu_intrinsics() -> None:
    """Register the CPU tensor intrinsics (x86 VNNI/AVX-512, Arm NEON/dot-product) MetaSchedule uses.

    ``import tvm.s_tir.tensor_intrin`` (which ``TuneContext`` does) parses every intrinsic TVM has, the
    CUDA ones included: 35-55 s on a 2-core machine. Only the CPU ones are needed to tune for, or replay
    records on, a CPU, and they take about a second, so the package is entered into ``sys.modules``
    without running its ``__init__``; its other submodules still import on demand.
    """
    name = "tvm.s_tir.tensor_intrin"
    if name not in sys.modules:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.submodule_search_locations is None:
            return
        package = types.ModuleType(name)
        package.__path__ = list(spec.submodule_search_locations)
        package.__spec__ = spec
        package.__package__ = name
        sys.modules[name] = package
        tvm.s_tir.tensor_intrin = package  # type: ignore[attr-defined]
    for cpu in ("x86", "arm_cpu"):
        importlib.import_module(f"{name}.{cpu}")
    register_intrinsics()  # ohq-tvm's own (kernels register theirs lazily, per ISA)


@dataclass
class TuningDatabase:
    """The tuning records of one target: a MetaSchedule ``JSONDatabase`` in :attr:`path`."""

    path: Path
    target: Target
    database: ms.Database  # every measured candidate
    confirmed: ms.Database  # per workload, the record a build takes (re-timed after the search)

    @classmethod
    def open(
        cls, board: BoardSpec, root: str | os.PathLike | None = None, emulated: bool = False
    ) -> TuningDatabase:
        """Open (creating if needed) the database for ``board``'s target under ``root``.

        ``root`` defaults to :func:`default_tuning_root`. ``emulated``: the database of the board's emulated
        twin (``...-emulated``): schedules chosen by emulated timings never reach a real board's builds.
        Raises :class:`TuningError` naming the directory when it cannot be created or written, or when its
        files are not a MetaSchedule database.
        """
        target = tuning_target(board)
        base = Path(root) if root is not None else default_tuning_root()
        path = base.expanduser() / (_directory_name(target) + ("-emulated" if emulated else ""))
        fix = f"pass another directory with --tuning-dir or set {TUNING_DIR_ENV}"
        try:
            (path / "confirmed").mkdir(parents=True, exist_ok=True)
            marker = path / "target.json"
            marker.write_text(json.dumps(plain_json(target.export()), indent=2) + "\n")
        except OSError as err:
            reason = err.strerror or type(err).__name__
            raise TuningError(f"tuning directory {path} cannot be written ({reason}); {fix}") from None
        register_cpu_intrinsics()
        try:
            database = ms.database.JSONDatabase(work_dir=str(path), module_equality="structural")
            confirmed = ms.database.JSONDatabase(
                work_dir=str(path / "confirmed"), module_equality="structural"
            )
        except Exception as err:  # TVM raises builtin types (ValueError, RuntimeError)
            lines = str(err).strip().splitlines()
            raise TuningError(
                f"tuning database in {path} is unreadable ({lines[-1] if lines else err!r}); "
                f"delete the directory to start afresh, or {fix}"
            ) from None
        return cls(path, target, database, confirmed)

    @property
    def for_build(self) -> ms.Database:
        """What builds apply: the confirmed record of a workload, else the search's best."""
        return ms.database.OrderedUnionDatabase(self.confirmed, self.database)

    def best_seconds(self, task_mod: tvm.IRModule) -> float | None:
        """Mean run time of the record a build takes for a (normalised) task module; ``None`` if none."""
        for database in (self.confirmed, self.database):
            if not database.has_workload(task_mod):
                continue
            records = database.get_top_k(database.commit_workload(task_mod), 1)
            if records:
                run_secs = [float(s) for s in records[0].run_secs]
                return sum(run_secs) / len(run_secs)
        return None

    def __len__(self) -> int:
        """Number of stored records (failed measurements included)."""
        return len(self.database)
