"""The quiet gate: timings wait for the board's usual speed, and what was timed in a slow spell is redone."""

from __future__ import annotations

import itertools

import pytest
import tvm

from ohq_tvm import Precision, models
from ohq_tvm.codegen.module import lower_for_board
from ohq_tvm.frontend import load_onnx
from ohq_tvm.oqa import LatencyDatabase, Measurer, TimingConfig, extract_workloads, kernel_timing
from ohq_tvm.oqa.kernel_timing import build_kernel_library, time_kernels
from ohq_tvm.oqa.quiet import QuietGate, QuietWait, canary_probe
from ohq_tvm.passes import AnnotateCandidates
from ohq_tvm.targets import resolve_target

HOST = resolve_target("host")
FAST = TimingConfig(repeat=2, min_repeat_ms=5, warmup=1, quiet_wait_s=0)


def _scripted(values):
    """A probe returning ``values`` in turn (then the last one forever), and the list of calls."""
    calls = []
    it = itertools.chain(values, itertools.repeat(values[-1]))

    def probe():
        calls.append(1)
        return next(it)

    return probe, calls


class _Timer:
    """What ``time_evaluator`` returns, scripted: each call's runs take ``seconds`` in turn."""

    def __init__(self, seconds):
        self.seconds = iter(seconds)
        self.calls = 0

    def __call__(self, *args):
        self.calls += 1
        return type("Result", (), {"results": [next(self.seconds)] * 5})()


def test_the_canary_is_warmed_up_before_its_first_probe():
    """A fresh session's first canary runs are often much slower than the next ones: were the first probe
    one of them, every timing would wait for nothing."""
    timer = _Timer([0.3e-3, 0.15e-3, 0.16e-3])
    library = type("Library", (), {"time_evaluator": lambda self, *a, **k: timer})()
    probe = canary_probe(library, tvm.cpu(), lambda step, action: action())
    assert timer.calls == 1  # the warm-up, before any probe
    assert probe() == pytest.approx(0.15) and probe() == pytest.approx(0.16)


def test_the_gate_waits_for_the_usual_speed_and_gives_up_after_its_limit():
    sleeps = []
    gate = QuietGate(tolerance=1.25, max_wait_s=60, sleep=sleeps.append)
    assert gate.wait(_scripted([1.0])[0]) == 1.0 and gate.best_ms == 1.0 and not sleeps
    # Slow (2x) twice, then back within tolerance: two pauses, one timing that waited.
    probe, calls = _scripted([2.0, 1.9, 1.1])
    assert gate.wait(probe) == 1.1 and len(calls) == 3 and len(sleeps) == 2
    assert gate.waits == 1 and gate.is_quiet(1.2) and not gate.is_quiet(1.3)
    # A faster canary lowers the bar for what follows.
    gate.wait(_scripted([0.5])[0])
    assert gate.best_ms == 0.5 and not gate.is_quiet(1.0)
    # A board that stays slow: the gate gives up after max_wait_s and the timing goes ahead.
    patient = QuietGate(max_wait_s=0.05, pause_s=0.01)
    patient.wait(_scripted([1.0])[0])
    assert patient.wait(_scripted([3.0])[0]) == 3.0 and patient.waits == 1 and patient.waited_s >= 0.05


class _Clock:
    """A fake monotonic clock that only a (fake) sleep moves."""

    def __init__(self) -> None:
        self.now_s = 0.0

    def __call__(self) -> float:
        return self.now_s

    def sleep(self, seconds: float) -> None:
        self.now_s += seconds


def test_a_wait_reports_each_look_at_the_board_and_how_it_ended():
    """A busy board must not make a run go quiet: every slow look says how long it has waited of the
    cap, and the end of the wait says whether the board settled or the timing went ahead anyway."""
    clock = _Clock()
    gate = QuietGate(tolerance=1.25, max_wait_s=30, pause_s=5, sleep=clock.sleep, clock=clock)
    heard: list[QuietWait] = []
    gate.wait(_scripted([1.0])[0], heard.append)
    assert heard == []  # quiet at once: nothing to say
    # Slow twice, then back: two looks while waiting (at 0 s and 5 s), then settled after 10 s.
    gate.wait(_scripted([2.0, 2.0, 1.1])[0], heard.append)
    assert heard == [
        QuietWait(0.0, 30, 2.0, 1.0),
        QuietWait(5.0, 30, 2.0, 1.0),
        QuietWait(10.0, 30, 1.1, 1.0, settled=True),
    ]
    assert heard[1].describe() == (
        "waiting for the board to settle: 5 s of up to 30 s (canary 2.00 ms, usual 1.00 ms)"
    )
    assert heard[2].describe() == "board settled after 10 s"
    # A board that stays busy: a look every 5 s up to the cap, then the timing goes ahead in the spell.
    heard.clear()
    gate.wait(_scripted([3.0])[0], heard.append)
    assert [w.waited_s for w in heard] == [0, 5, 10, 15, 20, 25, 30]
    assert [w.settled for w in heard] == [None] * 6 + [False]
    assert (
        heard[-1].describe() == "board still busy after 30 s (canary 3.00 ms, usual 1.00 ms): timing anyway"
    )
    assert gate.waits == 2 and gate.waited_s == 40.0


def _library(tmp_path):
    imported = load_onnx(models.conv_model(channels=8, size=8))
    annotated = AnnotateCandidates([Precision.FP32], pin_first_last=False)(imported.mod)
    (workload,) = [w for w in extract_workloads(annotated).unique() if w.kind == "layer"]
    path = tmp_path / "k.so"
    return path, build_kernel_library(lower_for_board(workload.module(), HOST), HOST, path)


def test_kernels_timed_in_a_slow_spell_are_timed_again(loopback_board, tmp_path, monkeypatch):
    path, calls = _library(tmp_path)
    session = loopback_board.connect()
    # The real canary runs on the board and takes a plausible time.
    stats, canary = time_kernels(session, path, calls, repeat=2, min_repeat_ms=5, gate=QuietGate())
    assert 0 < canary < 100 and stats.median_ms > 0
    # Scripted: quiet before, slow after the first timing, quiet after the second: timed twice.
    probe, probes = _scripted([1.0, 2.0, 1.0, 1.0])
    monkeypatch.setattr(kernel_timing, "canary_probe", lambda *args: probe)
    timed = []
    real = kernel_timing._time_call
    monkeypatch.setattr(kernel_timing, "_time_call", lambda *a: timed.append(1) or real(*a))
    del session  # a library is uploaded once per session; the board serves one session at a time
    session = loopback_board.connect()
    _, after = time_kernels(session, path, calls, repeat=2, min_repeat_ms=5, gate=QuietGate(max_wait_s=0))
    assert after == 1.0 and len(probes) == 4 and len(timed) == 2 * len(calls)


def test_a_run_that_began_in_a_slow_spell_retimes_what_it_measured_then(
    loopback_board, tmp_path, monkeypatch
):
    imported = load_onnx(models.conv_model(channels=8, size=8))
    annotated = AnnotateCandidates([Precision.FP32, Precision.INT8], pin_first_last=False)(imported.mod)
    workloads = extract_workloads(annotated).unique()
    # The first three timings see a slow canary (the gate knows no better yet), the rest a fast one; the
    # first re-timing finds the board slow for one look (a 0.5 s pause), then quiet.
    timings = []

    def probe_factory(*args):
        timings.append(1)
        if len(timings) == len(workloads) + 1:
            looks = iter([1.5])
            return lambda: next(looks, 1.0)
        slow = len(timings) <= 3
        return lambda: 2.0 if slow else 1.0

    monkeypatch.setattr(kernel_timing, "canary_probe", probe_factory)
    events = []
    timing = TimingConfig(repeat=2, min_repeat_ms=5, warmup=1, quiet_wait_s=5)
    with LatencyDatabase(tmp_path / "m.sqlite") as db:
        summary = Measurer(loopback_board, HOST, db, timing=timing).run(workloads, events.append)
        assert summary.measured == len(workloads) and summary.retimed == 3
        assert summary.quiet["canary_best_ms"] == 1.0 and summary.quiet["timings_that_waited"] == 1
        assert len(timings) == len(workloads) + 3
        # The first pass reports each workload once, counting to its total.
        first, later = events[: len(workloads)], events[len(workloads) :]
        assert [(e.status, e.done, e.total) for e in first] == [
            ("ok", n, len(workloads)) for n in range(1, len(workloads) + 1)
        ]
        # The re-timings are a phase of their own, counted apart: each starts and finishes, and the wait
        # of the first one is heard while it lasts and when it ends.
        assert [(e.status, e.done, e.total) for e in later] == [
            ("retiming", 0, 3),
            ("waiting", 0, 3),
            ("waiting", 0, 3),
            ("retimed", 1, 3),
            ("retiming", 1, 3),
            ("retimed", 2, 3),
            ("retiming", 2, 3),
            ("retimed", 3, 3),
        ]
        assert len({e.workload.key for e in later if e.status == "retimed"}) == 3
        assert all(e.latency_ms > 0 for e in later if e.status == "retimed")
        waiting, settled = later[1].wait, later[2].wait
        assert (waiting.canary_ms, waiting.usual_ms, waiting.max_wait_s, waiting.settled) == (
            1.5,
            1.0,
            5,
            None,
        )
        assert settled.settled is True and settled.waited_s >= 0.5
        assert later[1].workload == later[0].workload
        assert len(db.measurements()) == len(workloads)


def test_a_negative_wait_is_refused():
    from ohq_tvm.errors import OHQError

    with pytest.raises(OHQError, match="quiet_wait_s"):
        TimingConfig(quiet_wait_s=-1)
