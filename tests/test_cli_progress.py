"""The command line's progress bars: waits for the board and re-timing said on the bar, an ETA that does
not extrapolate waits. Fed scripted events on a fake clock; the bars draw into a string."""

from __future__ import annotations

import io
from types import SimpleNamespace

from ohq_tvm.cli_progress import StageBars, WaitClock
from ohq_tvm.oqa.measure import MeasureEvent
from ohq_tvm.oqa.quiet import QuietWait


class _Clock:
    def __init__(self) -> None:
        self.now_s = 0.0

    def __call__(self) -> float:
        return self.now_s


def _workload(name: str):
    return SimpleNamespace(key=name, label=f"conv2d {name}")


def _bars() -> tuple[StageBars, _Clock, io.StringIO]:
    clock, out = _Clock(), io.StringIO()
    return StageBars(file=out, clock=clock), clock, out


def test_the_measuring_bar_says_when_it_waits_and_leaves_the_waits_out_of_its_eta(capsys):
    bars, clock, _ = _bars()
    bars.measuring(12, 10)
    assert "12 unique workloads, 2 already in the database" in capsys.readouterr().out
    assert "0/10" in str(bars.bar) and "ETA ?" in str(bars.bar)
    clock.now_s = 10.0
    bars.measured(MeasureEvent(_workload("a"), "ok", 1, 10, "w0", latency_ms=0.5))
    assert "1/10" in str(bars.bar) and "ETA 01:30, conv2d a" in str(bars.bar)
    # The next operator waits 30 s for the board: the bar says so while it lasts.
    waiting = QuietWait(0.0, 30.0, 0.45, 0.32)
    bars.measured(MeasureEvent(_workload("b"), "waiting", 1, 10, "w0", wait=waiting))
    clock.now_s = 22.0
    waiting = QuietWait(12.0, 30.0, 0.45, 0.32)
    bars.measured(MeasureEvent(_workload("b"), "waiting", 1, 10, "w0", wait=waiting))
    text = str(bars.bar)
    assert "waiting for the board to settle: 12 s of up to 30 s (canary 0.45 ms, usual 0.32 ms)" in text
    assert "ETA 01:30 + waits (waited 00:12 so far)" in text  # the wait is not extrapolated
    clock.now_s = 40.0
    settled = QuietWait(30.0, 30.0, 0.31, 0.31, settled=True)
    bars.measured(MeasureEvent(_workload("b"), "waiting", 1, 10, "w0", wait=settled))
    assert "board settled after 30 s" in str(bars.bar)
    # Timed in 10 s once the board settled: 20 s of timing for 2 operators, 8 to go at 10 s each (the
    # rate over all 50 s would have said 200 s).
    clock.now_s = 50.0
    bars.measured(MeasureEvent(_workload("b"), "ok", 2, 10, "w0", latency_ms=0.5))
    text = str(bars.bar)
    assert "2/10" in text and "ETA 01:20 + waits (waited 00:30 so far), conv2d b" in text
    bars.close()


def test_re_timing_gets_a_bar_of_its_own_instead_of_sitting_at_100_percent(capsys):
    bars, clock, out = _bars()
    bars.measuring(2, 2)
    for done, name in enumerate("ab", 1):
        clock.now_s = 10.0 * done
        bars.measured(MeasureEvent(_workload(name), "ok", done, 2, "w0", latency_ms=0.5))
    clock.now_s = 20.0
    bars.measured(MeasureEvent(_workload("a"), "retiming", 0, 3, "w0"))
    assert bars.bar.desc == "  re-timing" and "0/3" in str(bars.bar) and "conv2d a" in str(bars.bar)
    assert "measuring: 100%" in out.getvalue()  # the first pass's bar, closed
    clock.now_s = 25.0
    bars.measured(MeasureEvent(_workload("a"), "retimed", 1, 3, "w0", latency_ms=0.4))
    bars.measured(MeasureEvent(_workload("b"), "retiming", 1, 3, "w0"))
    assert "re-timing:  33%" in str(bars.bar) and "1/3" in str(bars.bar)
    assert "ETA 00:10" in str(bars.bar)  # 5 s per re-timing, its own pace
    clock.now_s = 30.0
    bars.measured(MeasureEvent(_workload("b"), "retimed", 2, 3, "w0", error="board died"))
    assert "re-timing conv2d b failed, its first timing stands: board died" in capsys.readouterr().out
    assert "2/3" in str(bars.bar)
    bars.close()


def test_waits_of_parallel_workers_that_overlap_count_once():
    clock = _Clock()
    waits = WaitClock(clock)
    waits.mark("w0", True)
    clock.now_s = 5.0
    waits.mark("w1", True)
    waits.mark("w1", True)  # a second look of the same wait
    clock.now_s = 10.0
    waits.mark("w0", False)
    assert waits.waited_s() == 10.0  # w1 still waits
    clock.now_s = 20.0
    waits.mark("w1", False)
    waits.mark("w1", False)  # a worker that was not waiting
    clock.now_s = 30.0
    assert waits.waited_s() == 20.0
    assert waits.eta_s(2, 6) == 20.0  # 10 s of timing for 2: 5 s each, 4 to go
    assert waits.eta_s(0, 6) is None
