"""Progress bars of the ``ohq-tvm`` commands (tqdm): what :class:`~ohq_tvm.progress.StageProgress` hears,
drawn on the terminal. Part of the command line with :mod:`ohq_tvm.cli` and :mod:`ohq_tvm.cli_planning`,
the modules that print.

Measuring operators is the long stage, and on a busy board much of it is waiting for the board to settle
(the quiet gate of :mod:`ohq_tvm.oqa.quiet`, up to its cap per timing). Its bar says when it waits, and
its ETA is extrapolated from the time spent timing alone, the waits so far named beside it: an ETA
that counted them would promise every remaining operator the same waits. The operators timed once more
at the end of a run get a bar of their own (``re-timing``) instead of leaving the first at 100%.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TextIO

from .progress import StageProgress

# The measuring bars draw their own ETA (see the module docstring) in place of tqdm's rate and remaining.
_MEASURE_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]"


def _clock_text(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes:02d}:{seconds:02d}"


class WaitClock:
    """The time a measuring phase spent with at least one of its timings waiting for the board, and the
    ETA of the rest from the time left over (``clock``: seconds, monotonic; injectable for tests).

    Waits of parallel workers that overlap count once: the run is held up while any of them waits.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.started_s = clock()
        self._waiting: set[str] = set()  # workers waiting now
        self._since_s = 0.0  # when the first of them began
        self._waited_s = 0.0  # spells that ended

    def mark(self, worker: str, waiting: bool) -> None:
        """``worker`` now waits for the board, or no longer does."""
        now = self._clock()
        if waiting and worker not in self._waiting:
            if not self._waiting:
                self._since_s = now
            self._waiting.add(worker)
        elif not waiting and worker in self._waiting:
            self._waiting.discard(worker)
            if not self._waiting:
                self._waited_s += now - self._since_s

    def waited_s(self) -> float:
        """Seconds of the phase in which some timing waited, the spell under way included."""
        ongoing = self._clock() - self._since_s if self._waiting else 0.0
        return self._waited_s + ongoing

    def eta_s(self, done: int, total: int) -> float | None:
        """Seconds the ``total - done`` remaining items take at the pace of the ``done`` ones, waits left
        out; ``None`` before the first is done."""
        if done <= 0:
            return None
        working_s = max(0.0, self._clock() - self.started_s - self.waited_s())
        return working_s / done * max(0, total - done)

    def describe(self, done: int, total: int) -> str:
        """``ETA 01:20``, and when timings waited, ``ETA 01:20 + waits (waited 00:30 so far)``."""
        eta_s = self.eta_s(done, total)
        text = "ETA ?" if eta_s is None else f"ETA {_clock_text(eta_s)}"
        waited_s = self.waited_s()
        return text + (f" + waits (waited {_clock_text(waited_s)} so far)" if waited_s >= 0.5 else "")


class StageBars(StageProgress):
    """tqdm bars for the long stages (operators measured and re-timed, MQE forward passes, tuning
    trials); stage messages close the open bar and print one line. ``file``: where bars are drawn
    (default: standard error); ``clock``: the measuring bars' clock (see :class:`WaitClock`)."""

    def __init__(self, file: TextIO | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.bar = None
        self.file = file
        self.clock = clock
        self.waits: WaitClock | None = None  # of the measuring or re-timing bar, when one is open

    def _open(self, total: int, unit: str, desc: str, bar_format: str | None = None):
        from tqdm import tqdm

        self.close()
        self.bar = tqdm(
            total=total, unit=unit, desc=desc, disable=total == 0, file=self.file, bar_format=bar_format
        )
        return self.bar

    def _open_measuring(self, total: int, desc: str) -> None:
        self._open(total, "op", desc, _MEASURE_FORMAT)
        self.waits = WaitClock(self.clock)
        self.bar.set_postfix_str(self.waits.describe(0, total), refresh=False)

    def say(self, message: str) -> None:
        self.close()
        print(f"  {message}", flush=True)

    def measuring(self, total: int, to_measure: int) -> None:
        print(f"  {total} unique workloads, {total - to_measure} already in the database", flush=True)
        self._open_measuring(to_measure, "  measuring")

    def measured(self, event) -> None:
        """One :class:`~ohq_tvm.oqa.measure.MeasureEvent`: see its statuses."""
        if event.status == "retiming" and (self.bar is None or self.bar.desc != "  re-timing"):
            # The first pass is over: some of it is timed once more, on a bar of its own.
            self._open_measuring(event.total, "  re-timing")
        bar, waits = self.bar, self.waits
        if bar is None or waits is None:
            return
        waiting = event.status == "waiting" and event.wait.settled is None
        waits.mark(event.worker, waiting)
        if event.status == "retry":
            bar.write(f"  retrying {event.workload.label}: {event.error}")
        elif event.status == "failed":
            bar.write(f"  FAILED {event.workload.label}: {event.error}")
        elif event.status == "retimed" and event.error is not None:
            bar.write(f"  re-timing {event.workload.label} failed, its first timing stands: {event.error}")
        doing = event.wait.describe() if event.status == "waiting" else event.workload.label[:40]
        bar.set_postfix_str(f"{waits.describe(event.done, event.total)}, {doing}", refresh=False)
        if event.status in ("ok", "failed", "retimed"):
            bar.update(max(0, event.done - bar.n))  # events of parallel workers may cross
        else:
            bar.refresh()

    def distilling(self, done: int, total: int) -> None:
        if self.bar is None or self.bar.desc != "  distilling":
            self._open(total, "step", "  distilling")
        self.bar.update(done - self.bar.n)

    def estimating(self, done: int, total: int) -> None:
        if self.bar is None or self.bar.desc != "  sensitivity":
            self._open(total, "pass", "  sensitivity")
        self.bar.update(done - self.bar.n)

    def tuning(self, event) -> None:
        if self.bar is None or self.bar.desc != "  tuning":
            self._open(event.trials_total, "trial", "  tuning")
        if event.task:
            best = "-" if event.best_ms is None else f"{event.best_ms:.4f} ms"
            self.bar.set_postfix_str(f"{event.task[:32]} best {best}", refresh=False)
        self.bar.update(min(event.trials_done, event.trials_total) - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self.waits = None


__all__ = ["StageBars", "WaitClock"]
