"""Time only while the board runs at its usual speed: a canary kernel, and a gate that waits for it.

A board shared with other work, or a virtual machine whose cores the hypervisor moves about, has phases
in which a model runs far slower than usual. On the 2-core host (a VM) MobileNetV2 alternates between
6.4 ms and 12.1 ms in phases of 10-40 s while a compute-bound and a streaming kernel keep their speed:
what slows down is data passing between the cores (with one thread there are no phases). A latency
measured in such a phase is not the operator's.

The canary is a small two-kernel function in which every pass hands half of a 1 MB buffer from one
core to the other (written parallel over rows, read parallel over columns): 0.32 ms in the fast phase,
0.45 ms in the slow one on that host. :class:`QuietGate` remembers the fastest canary of a run and, before
a timing, waits (up to ``max_wait_s``) until the canary is within ``tolerance`` of it; after the timing
it looks again, and the caller times once more when the board slowed down meanwhile. A caller that
shows progress passes ``on_wait``: it hears of each look at the board while a timing waits
(:class:`QuietWait`), and of how the wait ended.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import tvm
from tvm import s_tir, te, tirx

CANARY_SYMBOL = "ohq_canary"
_SIZE = 512  # floats per side: 1 MB, half of which changes cores per pass
_RUNS = 5  # canary runs per probe (its median)
T = TypeVar("T")


def canary_function() -> tirx.PrimFunc:
    """The canary as a scheduled PrimFunc ``(a, c)`` over two float32 ``_SIZE x _SIZE`` buffers."""
    a = te.placeholder((_SIZE, _SIZE), "float32", name="a")
    b = te.compute((_SIZE, _SIZE), lambda i, j: a[i, j] + tirx.const(1.0, "float32"), name="b")
    c = te.compute((_SIZE, _SIZE), lambda j, i: b[i, j] * tirx.const(0.5, "float32"), name="c")
    sch = s_tir.Schedule(te.create_prim_func([a, c]))
    for stage in ("b", "c"):
        outer, _ = sch.get_loops(sch.get_sblock(stage))
        sch.parallel(outer)
    return sch.mod["main"].with_attr("global_symbol", CANARY_SYMBOL)


def canary_executable(target: tvm.target.Target) -> tvm.runtime.Executable:
    """The canary alone, compiled for ``target`` (for timings whose own library does not carry it)."""
    return tvm.compile(tvm.IRModule({CANARY_SYMBOL: canary_function()}), target=target)


def canary_probe(library: tvm.runtime.Module, device: tvm.runtime.Device, guard) -> Callable[[], float]:
    """A callable timing the canary of ``library`` on ``device`` (ms, median of a few runs); each board
    step goes through ``guard(step, action)`` (a session's error wrapper)."""
    rng = np.random.default_rng(0)
    args = guard(
        "copying canary inputs",
        lambda: [tvm.runtime.tensor(rng.random((_SIZE, _SIZE), dtype="float32"), device) for _ in "ac"],
    )
    timer = guard(
        "creating the canary timer",
        lambda: library.time_evaluator(CANARY_SYMBOL, device, number=1, repeat=_RUNS),
    )
    # A fresh session's first runs are often about twice as slow (likely its threads not yet spread over
    # the cores): warm up so that the first probe does not make the gate wait for nothing.
    guard("warming the canary up", lambda: timer(*args))
    return lambda: float(np.median(guard("timing the canary", lambda: timer(*args)).results)) * 1e3


@dataclass(frozen=True)
class QuietWait:
    """A timing waiting for the board to settle: ``waited_s`` of at most ``max_wait_s`` so far, the last
    canary and the run's fastest (``usual_ms``). ``settled`` is ``None`` while it waits, ``True`` once
    the canary is back within tolerance, ``False`` when the gate gave up at ``max_wait_s`` (the timing
    then goes ahead in the slow spell)."""

    waited_s: float
    max_wait_s: float
    canary_ms: float
    usual_ms: float
    settled: bool | None = None

    def describe(self) -> str:
        """One line for a progress bar, e.g. ``waiting for the board to settle: 12 s of up to 30 s ...``."""
        canary = f"canary {self.canary_ms:.2f} ms, usual {self.usual_ms:.2f} ms"
        if self.settled is None:
            return (
                f"waiting for the board to settle: {self.waited_s:.0f} s of up to {self.max_wait_s:.0f} s "
                f"({canary})"
            )
        if self.settled:
            return f"board settled after {self.waited_s:.0f} s"
        return f"board still busy after {self.waited_s:.0f} s ({canary}): timing anyway"


class QuietGate:
    """Shared by the timings of one run (thread-safe): the fastest canary seen, and the waiting.

    ``sleep`` and ``clock`` (seconds, monotonic) are injectable so that tests run on a fake clock.
    """

    def __init__(
        self,
        tolerance: float = 1.25,
        max_wait_s: float = 30.0,
        pause_s: float = 0.5,
        sleep: Callable[[float], None] = time.sleep,
        enabled: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.enabled = enabled  # off: timings run at once, no canary is probed (an emulated board)
        self.tolerance = tolerance
        self.max_wait_s = max_wait_s
        self.pause_s = pause_s
        self.best_ms: float | None = None
        self.waited_s = 0.0  # in total
        self.waits = 0  # timings that had to wait
        self._lock = threading.Lock()
        self._sleep = sleep
        self._clock = clock

    def _seen(self, canary_ms: float) -> bool:
        """Record a probe; whether it is quiet (within tolerance of the fastest)."""
        with self._lock:
            if self.best_ms is None or canary_ms < self.best_ms:
                self.best_ms = canary_ms
            return canary_ms <= self.best_ms * self.tolerance

    def is_quiet(self, canary_ms: float) -> bool:
        with self._lock:
            return self.best_ms is None or canary_ms <= self.best_ms * self.tolerance

    def wait(self, probe: Callable[[], float], on_wait: Callable[[QuietWait], None] | None = None) -> float:
        """Probe until quiet or ``max_wait_s`` passed; return the last canary (ms). ``on_wait`` hears of
        every slow probe before the pause after it, and once of how the wait ended; nothing when the
        first probe is quiet."""
        started = self._clock()
        canary = probe()
        waited = False
        while not self._seen(canary):
            waited_s = self._clock() - started
            if waited_s >= self.max_wait_s:
                break
            waited = True
            if on_wait is not None:
                on_wait(QuietWait(waited_s, self.max_wait_s, canary, self.best_ms))
            self._sleep(self.pause_s)
            canary = probe()
        if waited:
            waited_s = self._clock() - started
            with self._lock:
                self.waits += 1
                self.waited_s += waited_s
            if on_wait is not None:
                on_wait(QuietWait(waited_s, self.max_wait_s, canary, self.best_ms, self.is_quiet(canary)))
        return canary

    def time(
        self,
        probe: Callable[[], float],
        timing: Callable[[], T],
        attempts: int = 3,
        settle_s: float = 0.0,
        on_wait: Callable[[QuietWait], None] | None = None,
    ) -> tuple[T, float | None]:
        """Run ``timing`` once the board is quiet (after ``settle_s`` more), again while the canary after
        it says the board slowed down meanwhile, up to ``attempts`` times in all; return the last result
        and the canary after it (``None`` when the gate is off: ``probe`` is not called). ``on_wait``: as
        for :meth:`wait`."""
        if not self.enabled:
            return timing(), None
        for attempt in range(1, attempts + 1):
            self.wait(probe, on_wait)
            if settle_s:
                self._sleep(settle_s)
            result = timing()
            after = probe()
            if self.is_quiet(after) or attempt == attempts:
                return result, after
        raise AssertionError("unreachable")

    def to_json(self) -> dict:
        return {
            "enabled": self.enabled,
            "canary_best_ms": self.best_ms,
            "tolerance": self.tolerance,
            "timings_that_waited": self.waits,
            "waited_s": round(self.waited_s, 3),
        }


__all__ = ["CANARY_SYMBOL", "QuietGate", "QuietWait", "canary_executable", "canary_function", "canary_probe"]
