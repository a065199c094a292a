"""The quiet gate: timings wait for the board's usual speed, and what was timed in a slow spell is redone."""

from __future__ import annotations

import itertools

import pytest
import tvm

from ohq_tvm import Precision, models
from ohq_tvm.build.module import lower_for_board
from ohq_tvm.frontend import load_onnx
from ohq_tvm.oqa import LatencyDatabase, Measurer, TimingConfig, extract_workloads, kernel_timing
from ohq_tvm.oqa.kernel_timing import build_kernel_library, time_kernels
from ohq_tvm.oqa.quiet import QuietGate, canary_probe
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
    # The first three timings see a slow canary (the gate knows no better yet), the rest a fast one.
    timings = []

    def probe_factory(*args):
        timings.append(1)
        slow = len(timings) <= 3
        return lambda: 2.0 if slow else 1.0

    monkeypatch.setattr(kernel_timing, "canary_probe", probe_factory)
    events = []
    with LatencyDatabase(tmp_path / "m.sqlite") as db:
        summary = Measurer(loopback_board, HOST, db, timing=FAST).run(workloads, events.append)
        assert summary.measured == len(workloads) and summary.retimed == 3
        assert summary.quiet["canary_best_ms"] == 1.0
        assert len(timings) == len(workloads) + 3
        # Progress reports each workload once; the re-timings replace rows without new events.
        assert [e.done for e in events] == list(range(1, len(workloads) + 1))
        assert len(db.measurements()) == len(workloads)


def test_a_negative_wait_is_refused():
    from ohq_tvm.errors import OHQError

    with pytest.raises(OHQError, match="quiet_wait_s"):
        TimingConfig(quiet_wait_s=-1)
