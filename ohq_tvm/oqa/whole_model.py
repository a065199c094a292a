"""A model built whole and timed on the board the way its parts were timed (:mod:`.in_model` uses it).

Each library is timed in interleaved rounds (every library once per round, so that a slow spell hits
them alike) in one session, each timing once the quiet gate (:mod:`.quiet`) finds the board at its usual
speed, again (up to twice) when the canary after it says the board slowed down meanwhile. A timing whose
last canary still says so is counted as slow: :mod:`.in_model` does not plan on such numbers silently.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from ..board import Board
from ..board.session import LatencyStats
from ..calibration import calibrate
from ..codegen.module import build_executable
from ..codegen.toolchain import find_toolchain
from ..errors import BoardError
from ..frontend import ImportedModel, synthetic_inputs
from ..layers import quantizable_layers
from ..passes.apply_plan import ApplyPlan
from ..plan import Plan
from ..precision import Precision
from .quiet import QuietGate, canary_executable, canary_probe

K = TypeVar("K")

# Whole-model timings per plan, interleaved: each of ``repeat`` x ``min_repeat_ms`` (the parts' config).
ROUNDS = 5


@dataclass(frozen=True)
class WholeTiming:
    """A library's repeats over every round, and how many of its timings ended with the board slow."""

    stats: LatencyStats
    slow_timings: int = 0  # timings after which the canary was still slower than the gate allows
    timings: int = 0


class UniformBuilds:
    """Builds each uniform plan of ``imported`` whole (once, on first use, into a temporary folder it
    owns) and times them on ``board`` (see the module docstring). A context manager; :meth:`close`
    deletes the builds.

    ``gate`` should be the quiet gate of the parts' measurement, so that wholes and parts are timed at
    the same speed of the board (:meth:`from_measurer` takes it, and the rest, from the measurer).
    """

    def __init__(
        self,
        imported: ImportedModel,
        spec,
        board: Board,
        gate: QuietGate,
        *,
        build_schedule: str = "default",
        tuning=None,
        repeat: int = 5,
        min_repeat_ms: int = 40,
        session_timeout_s: float = 300.0,
        progress: Callable[[str], None] | None = None,
    ) -> None:
        self.imported = imported
        self.spec = spec
        self.board = board
        self.gate = gate
        self.build_schedule = build_schedule
        self.tuning = tuning
        self.repeat = repeat
        self.min_repeat_ms = min_repeat_ms
        self.session_timeout_s = session_timeout_s
        self.progress = progress
        self._scratch = tempfile.TemporaryDirectory(prefix="ohq-tvm-whole-")
        self._libraries: dict[Precision, Path] = {}
        self._calibration = None

    @classmethod
    def from_measurer(
        cls, measurer, imported: ImportedModel, progress: Callable[[str], None] | None = None
    ) -> UniformBuilds:
        """Builds timed with the board, timing, schedule and quiet gate of a :class:`~.measure.Measurer`."""
        return cls(
            imported,
            measurer.spec,
            measurer.board,
            measurer.gate,
            build_schedule=measurer.build_schedule,
            tuning=measurer.tuning,
            repeat=measurer.timing.repeat,
            min_repeat_ms=measurer.timing.min_repeat_ms,
            progress=progress,
        )

    def _library(self, precision: Precision) -> Path:
        if precision not in self._libraries:
            if precision.is_integer and self._calibration is None:
                # The values do not change the kernels: a quick synthetic calibration will do.
                self._calibration = calibrate(self.imported, "minmax", num_samples=2)
            plan = Plan.uniform(quantizable_layers(self.imported.mod), precision)
            mod = ApplyPlan(plan, self._calibration if precision.is_integer else None)(self.imported.mod)
            if self.progress is not None:
                self.progress(f"building the uniform {precision.value} plan whole")
            path = Path(self._scratch.name) / f"whole_{precision.value}.so"
            build_executable(mod, self.spec, self.build_schedule, self.tuning).export_library(
                str(path), fcompile=find_toolchain(self.spec.cross_triple).fcompile()
            )
            self._libraries[precision] = path
        return self._libraries[precision]

    def time(self, precisions: Sequence[Precision]) -> dict[Precision, WholeTiming]:
        """The uniform plans of ``precisions``, built if not yet, timed in interleaved rounds. Raises
        :class:`~ohq_tvm.errors.BoardError` when the board fails twice in a row."""
        libraries = {precision: self._library(precision) for precision in precisions}
        return time_whole_rounds(
            self.board,
            self.spec,
            libraries,
            self.imported,
            self.repeat,
            self.min_repeat_ms,
            self.gate,
            self.session_timeout_s,
        )

    def close(self) -> None:
        self._scratch.cleanup()

    def __enter__(self) -> UniformBuilds:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def time_with_measurer(
    measurer, libraries: Mapping[K, Path], imported: ImportedModel, rounds: int = ROUNDS
) -> dict[K, LatencyStats]:
    """The repeats of :func:`time_whole_rounds` on the board, by key, with the timing and quiet gate of the
    :class:`~.measure.Measurer` that measured the parts (so wholes and parts are timed alike)."""
    timed = time_whole_rounds(
        measurer.board,
        measurer.spec,
        libraries,
        imported,
        measurer.timing.repeat,
        measurer.timing.min_repeat_ms,
        measurer.gate,
        rounds=rounds,
    )
    return {key: timing.stats for key, timing in timed.items()}


def time_whole_rounds(
    board: Board,
    spec,
    libraries: Mapping[K, Path],
    imported: ImportedModel,
    repeat: int,
    min_repeat_ms: int,
    gate: QuietGate,
    session_timeout_s: float = 300.0,
    rounds: int = ROUNDS,
) -> dict[K, WholeTiming]:
    """Time exported builds of ``imported`` (by any key) on ``board``: ``rounds`` rounds, each timing every
    library once (so a slow spell hits them alike), in one session, each timing once ``gate`` finds the
    board quiet (and again, up to twice, when it slowed down meanwhile). A failed session is retried
    once; then the :class:`~ohq_tvm.errors.BoardError` is raised."""
    inputs = list(synthetic_inputs(imported.inputs).values())
    with tempfile.TemporaryDirectory(prefix="ohq-tvm-canary-") as scratch:
        canary = Path(scratch) / "canary.so"
        canary_executable(spec.tvm_target()).export_library(
            str(canary), fcompile=find_toolchain(spec.cross_triple).fcompile()
        )
        for attempt in range(2):
            try:
                session = board.connect(session_timeout_s=session_timeout_s)
                vms = {key: session.load_vm(path) for key, path in libraries.items()}
                probe = (
                    canary_probe(session.load_library(canary), session.device, session._guard)
                    if gate.enabled
                    else None
                )
                repeats = {key: [] for key in libraries}
                slow = dict.fromkeys(libraries, 0)
                for _ in range(rounds):
                    for key, vm in vms.items():
                        stats, after = gate.time(
                            probe, lambda vm=vm: vm.time(inputs, repeat=repeat, min_repeat_ms=min_repeat_ms)
                        )
                        repeats[key] += stats.repeats_ms
                        slow[key] += after is not None and not gate.is_quiet(after)
                return {
                    key: WholeTiming(LatencyStats(tuple(r)), slow[key], rounds) for key, r in repeats.items()
                }
            except BoardError:
                if attempt:
                    raise
            finally:
                vms = session = probe = None  # release the session: a board may serve one at a time
    raise AssertionError("unreachable")


__all__ = [
    "ROUNDS",
    "UniformBuilds",
    "WholeTiming",
    "time_whole_rounds",
    "time_with_measurer",
]
