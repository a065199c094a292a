"""An open RPC session on a board: upload a compiled module, run it, time it.

Every RPC failure (the board died, the connection dropped, the module would not load) surfaces as a
:class:`BoardError` naming the board and the step, never as a bare TVM error; so does a board that does
not answer a step within the session's deadline (:mod:`.deadlines`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import tvm
from tvm import relax

from ..errors import BoardError
from ..interrupts import reraise_interrupt
from .deadlines import within
from .threads import remote_threads

T = TypeVar("T")


# A timing whose repeats' interquartile range exceeds this share of their median is called noisy: the
# board's speed changed while it ran (other work, a slow spell of :mod:`ohq_tvm.oqa.quiet`), and its
# median may be off. On the 2-core host, gated timings of whole models stay at 2-9% between 15 rounds
# (benchmarks/results/headline.json), while a slow spell makes a model 1.78x slower.
NOISY_IQR_PERCENT = 10.0


@dataclass(frozen=True)
class LatencyStats:
    """Per-repeat latencies of one function on a board, in milliseconds."""

    repeats_ms: tuple[float, ...]

    @property
    def median_ms(self) -> float:
        return float(np.median(self.repeats_ms))

    @property
    def min_ms(self) -> float:
        return float(np.min(self.repeats_ms))

    @property
    def spread_ms(self) -> float:
        """Interquartile range: robust against the odd preempted repeat on a noisy board."""
        q75, q25 = np.percentile(self.repeats_ms, [75, 25])
        return float(q75 - q25)

    @property
    def iqr_percent(self) -> float:
        """The interquartile range as a percentage of the median."""
        median_ms = self.median_ms
        return 100.0 * self.spread_ms / median_ms if median_ms > 0 else 0.0

    @property
    def noisy(self) -> bool:
        """Whether the repeats spread beyond :data:`NOISY_IQR_PERCENT` of their median."""
        return self.iqr_percent > NOISY_IQR_PERCENT

    def describe_spread(self) -> str:
        """E.g. ``IQR 0.120 ms, 1.9% of the median, over 5 repeats``."""
        return (
            f"IQR {self.spread_ms:.3f} ms, {self.iqr_percent:.1f}% of the median, over "
            f"{len(self.repeats_ms)} repeats"
        )

    def noise_warning(self, what: str) -> str | None:
        """A sentence saying that the timing of ``what`` is noisy, or ``None`` when it is not."""
        if not self.noisy:
            return None
        return (
            f"the latency of {what} is noisy: its repeats spread by {self.iqr_percent:.1f}% of their "
            f"median (IQR over {len(self.repeats_ms)} repeats), above the {NOISY_IQR_PERCENT:.0f}% a "
            "steady board stays within; the board was likely busy or in a slow spell, so the median may "
            "be off: time it again on a quiet board"
        )

    def to_json(self) -> dict:
        return {
            "median_ms": self.median_ms,
            "min_ms": self.min_ms,
            "iqr_ms": self.spread_ms,
            "iqr_percent": self.iqr_percent,
            "noisy": self.noisy,
            "noisy_above_iqr_percent": NOISY_IQR_PERCENT,
            "repeats_ms": list(self.repeats_ms),
        }


class BoardSession:
    """An RPC session on one board (wraps ``tvm.rpc.RPCSession``).

    Each step on the board may take ``call_timeout_s`` (plus the time a step is expected to run, for
    timings and uploads); ``None``: no limit.
    """

    def __init__(
        self,
        remote: tvm.rpc.RPCSession,
        label: str,
        explain: Callable[[], str | None] | None = None,
        call_timeout_s: float | None = None,
    ) -> None:
        self.remote = remote
        self.label = label
        # Asked after a failed step for what the board knows of its cause (e.g. an emulated board's
        # server that died of an illegal instruction, which the RPC error cannot tell).
        self.explain = explain
        self.call_timeout_s = call_timeout_s

    def _guard(self, step: str, action: Callable[[], T], expected_s: float = 0.0) -> T:
        """``action`` (one or a few RPC calls), its failure a :class:`BoardError` naming ``step``; past
        the deadline (``call_timeout_s`` + ``expected_s``) too."""
        try:
            if self.call_timeout_s is None:
                return action()
            deadline_s = self.call_timeout_s + expected_s
            return within(deadline_s, f"board {self.label}: {step}", action, holding=self.remote)
        except (RuntimeError, OSError, ValueError) as err:
            reraise_interrupt()
            message = str(err).strip().splitlines()
            detail = message[-1] if message else type(err).__name__
            cause = self.explain() if self.explain is not None else None
            detail = f"{cause} ({detail})" if cause else detail
            raise BoardError(f"board {self.label}: {step} failed: {detail}") from err

    @property
    def device(self) -> tvm.runtime.Device:
        return self.remote.cpu()

    def describe(self) -> dict[str, str]:
        """What the board reports about itself: CPU and triple, where its runtime can tell, and the
        threads its runtime runs kernels on."""
        found: dict[str, str] = {}
        for field, function in (
            ("cpu", "target.llvm_get_system_cpu"),
            ("triple", "target.llvm_get_system_triple"),
        ):
            try:
                found[field] = str(self.remote.get_function(function)())
            except (RuntimeError, AttributeError, ValueError):  # a runtime-only board has no LLVM
                continue
        threads = remote_threads(self.remote)
        if threads is not None:
            found["threads"] = str(threads)
        return found

    def load_library(self, library_path: str | os.PathLike) -> tvm.runtime.Module:
        """Upload a library exported with ``export_library`` and load it on the board."""
        name = os.path.basename(os.fspath(library_path))
        # At least 1 MB/s on the slowest link a board is on.
        upload_s = os.path.getsize(library_path) / 1e6
        self._guard(f"upload of {name}", lambda: self.remote.upload(os.fspath(library_path)), upload_s)
        return self._guard(f"loading {name}", lambda: self.remote.load_module(name))

    def load_vm(self, library_path: str | os.PathLike) -> RemoteVM:
        """Upload a library exported with ``export_library`` and open a Relax VM on it."""
        name = os.path.basename(os.fspath(library_path))
        library = self.load_library(library_path)
        vm = self._guard(f"starting the VM for {name}", lambda: relax.VirtualMachine(library, self.device))
        return RemoteVM(self, vm, name)


class RemoteVM:
    """A Relax VM living on a board."""

    def __init__(self, session: BoardSession, vm: relax.VirtualMachine, name: str) -> None:
        self.session = session
        self.vm = vm
        self.name = name

    def _to_device(self, inputs: Sequence[np.ndarray]) -> list[tvm.runtime.Tensor]:
        device = self.session.device
        return self.session._guard(
            "copying inputs",
            lambda: [tvm.runtime.tensor(np.ascontiguousarray(x), device) for x in inputs],
        )

    def run(self, inputs: Sequence[np.ndarray], function: str = "main") -> list[np.ndarray]:
        """Run ``function`` once on the board; return its outputs (always a list) as numpy arrays."""
        args = self._to_device(inputs)
        guard = self.session._guard
        # The stateful interface fetches tuple fields by index on the board; a tuple returned by a
        # plain call would arrive as an opaque remote object reference.
        guard("setting inputs", lambda: self.vm.set_input(function, *args))
        guard(f"running {self.name}", lambda: self.vm.invoke_stateful(function))
        return guard("reading outputs", lambda: _flatten(self.vm.get_outputs(function)))

    def time(
        self,
        inputs: Sequence[np.ndarray],
        *,
        repeat: int = 5,
        number: int = 0,
        min_repeat_ms: int = 50,
        warmup: int = 1,
        function: str = "main",
    ) -> LatencyStats:
        """Time ``function`` on the board with ``time_evaluator``.

        ``number=0`` lets ``min_repeat_ms`` choose how many runs each repeat averages.
        """
        args = self._to_device(inputs)
        evaluator = self.session._guard(
            "creating the timer",
            lambda: self.vm.time_evaluator(
                function,
                self.session.device,
                number=max(number, 1),
                repeat=repeat,
                min_repeat_ms=int(min_repeat_ms) if number == 0 else 0,
                repeats_to_cooldown=1,
            ),
        )
        for _ in range(warmup):
            self.session._guard(f"warming up {self.name}", lambda: self.vm[function](*args))
        # Each repeat runs at least min_repeat_ms, and twice that while a run's count is being settled.
        expected_s = repeat * 2 * min_repeat_ms / 1e3
        report = self.session._guard(f"timing {self.name}", lambda: evaluator(*args), expected_s)
        return LatencyStats(tuple(float(r) * 1e3 for r in report.results))


def _flatten(value: object) -> list[np.ndarray]:
    if isinstance(value, tvm.runtime.Tensor):
        return [value.numpy()]
    if isinstance(value, (list, tuple)) or type(value).__name__ in {"Array", "List"}:
        out: list[np.ndarray] = []
        for item in value:  # type: ignore[attr-defined]
            out.extend(_flatten(item))
        return out
    raise TypeError(f"unexpected VM output of type {type(value).__name__}")
