"""On-board measurement against loopback boards: the database fills, reruns measure nothing, faults heal."""

from __future__ import annotations

import os
import signal
import sqlite3
import threading
import time

import numpy as np
import psutil
import pytest

from ohq_tvm import models
from ohq_tvm.board import LoopbackBoard, TrackerBoard
from ohq_tvm.board.boards import _free_port
from ohq_tvm.board.session import LatencyStats
from ohq_tvm.config import MeasurementConfig
from ohq_tvm.errors import BoardError, ConfigError, OHQError
from ohq_tvm.oqa import LatencyDatabase, Measurer, TimingConfig
from ohq_tvm.oqa.measure import MIN_REPEAT_ENV, QUIET_WAIT_ENV, REPEAT_ENV, schedule_label
from ohq_tvm.oqa.run import measure_model
from ohq_tvm.targets import resolve_target

from testing_support import FAST_TIMING, fp32_int8_workloads

HOST = resolve_target("host")


def test_timing_defaults_come_from_the_environment_and_bad_values_are_clear(monkeypatch):
    monkeypatch.setenv(REPEAT_ENV, "7")
    monkeypatch.setenv(MIN_REPEAT_ENV, "12")
    monkeypatch.setenv(QUIET_WAIT_ENV, "2.5")
    timing = TimingConfig()
    assert (timing.repeat, timing.min_repeat_ms, timing.quiet_wait_s) == (7, 12, 2.5)
    assert TimingConfig(repeat=3).repeat == 3  # what a caller says wins
    for name in (REPEAT_ENV, MIN_REPEAT_ENV, QUIET_WAIT_ENV):
        monkeypatch.delenv(name)
    timing = TimingConfig()
    assert (timing.repeat, timing.min_repeat_ms, timing.quiet_wait_s) == (5, 40, 10.0)
    monkeypatch.setenv(REPEAT_ENV, "five")
    with pytest.raises(OHQError, match=r"\$OHQ_TVM_REPEAT must be an integer, not 'five'"):
        TimingConfig()
    monkeypatch.setenv(REPEAT_ENV, "0")
    with pytest.raises(OHQError, match="repeat >= 1"):
        TimingConfig()


def test_database_keeps_results_and_never_overwrites_success_with_failure(tmp_path):
    (workload, other, *_) = fp32_int8_workloads()
    path = tmp_path / "m.sqlite"
    with LatencyDatabase(path) as db:
        db.add_board("fp", "board", {"key": "k"})
        db.record("fp", workload, "default", LatencyStats((1.0, 3.0, 2.0)))
        db.record_failure("fp", workload, "default", "boom", attempts=3)
        db.record_failure("fp", other, "default", "boom", attempts=3)
        assert db.missing("fp", "default", [workload, other]) == [other]
    with LatencyDatabase(path) as db:  # reopened: everything was committed
        assert db.latencies("fp", "default") == {workload.key: 2.0}
        rows = {m.workload.key: m for m in db.measurements()}
        assert rows[other.key].status == "failed" and rows[other.key].error == "boom"
        assert rows[workload.key].repeats_ms == (1.0, 3.0, 2.0)
        assert db.latencies("another board", "default") == {}
        assert db.clear("fp") == 2
        assert db.measurements() == []


def test_database_refuses_a_file_that_is_not_one(tmp_path):
    bad = tmp_path / "bad.sqlite"
    bad.write_bytes(b"not a database at all" * 100)
    with pytest.raises(OHQError, match="cannot open measurement database"):
        LatencyDatabase(bad)
    with sqlite3.connect(tmp_path / "old.sqlite") as conn:
        conn.execute("CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)")
        conn.execute("INSERT INTO meta VALUES ('schema', '999')")
    with pytest.raises(OHQError, match="schema 999"):
        LatencyDatabase(tmp_path / "old.sqlite")


def test_database_in_a_folder_that_cannot_be_made_is_one_error():
    with pytest.raises(OHQError, match=r"cannot open measurement database /proc/nope/x\.sqlite.*--db"):
        LatencyDatabase("/proc/nope/x.sqlite")


def test_reading_a_missing_database_creates_nothing(tmp_path):
    missing = tmp_path / "nowhere" / "m.sqlite"
    with pytest.raises(OHQError, match=r"m\.sqlite does not exist"):
        LatencyDatabase(missing, create=False)
    assert not (tmp_path / "nowhere").exists()
    with LatencyDatabase(tmp_path / "m.sqlite") as db:
        db.add_board("fp", "board", {"key": "k"})
    with LatencyDatabase(tmp_path / "m.sqlite", create=False) as db:
        assert [b["fingerprint"] for b in db.boards()] == ["fp"]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"workers": 0}, "workers must be at least 1, not 0"),
        ({"operator_budget": -1}, "budget must be at least 1 operator, not -1"),
        ({"precisions": []}, "no precisions"),
    ],
)
def test_measure_model_refuses_counts_that_measure_nothing(tmp_path, options, message):
    with pytest.raises(ConfigError, match=message):
        measurement = MeasurementConfig(database=tmp_path / "m.sqlite", **options)
        measure_model(tmp_path / "never-read.onnx", HOST, measurement=measurement)
    # The keyword arguments before the config still say the same, and that they are deprecated.
    old = {"budget" if name == "operator_budget" else name: value for name, value in options.items()}
    deprecated = pytest.warns(DeprecationWarning, match="pass measurement=MeasurementConfig")
    with deprecated, pytest.raises(ConfigError, match=message):
        measure_model(tmp_path / "never-read.onnx", HOST, database=tmp_path / "m.sqlite", **old)
    assert not (tmp_path / "m.sqlite").exists()


def test_measurement_fills_the_database_and_a_rerun_measures_nothing(loopback_board, tmp_path):
    workloads = fp32_int8_workloads()
    events = []
    with LatencyDatabase(tmp_path / "m.sqlite") as db:
        summary = Measurer(loopback_board, HOST, db, timing=FAST_TIMING).run(workloads, events.append)
        counts = (summary.total, summary.measured, summary.reused, summary.failed)
        assert counts == (len(workloads), len(workloads), 0, {})
        # Each workload's first timing finishes once (waits and re-timings on a busy host add their own).
        finished = [e.done for e in events if e.status in ("ok", "failed")]
        assert finished == list(range(1, len(workloads) + 1))
        stored = db.latencies(summary.fingerprint, schedule_label("default"))
        assert set(stored) == {w.key for w in workloads}
        assert all(0 < ms < 1000 for ms in stored.values())
        again = Measurer(loopback_board, HOST, db, timing=FAST_TIMING).run(workloads)
        assert (again.measured, again.reused) == (0, len(workloads))
        assert again.fingerprint == summary.fingerprint
        # Another model with the same operators (here: other weights) reuses every row.
        retrained = fp32_int8_workloads(models.conv_model(channels=8, size=8, seed=3))
        third = Measurer(loopback_board, HOST, db, timing=FAST_TIMING).run(retrained)
        assert (third.measured, third.reused) == (0, len(workloads))


@pytest.mark.slow  # about a minute on a 2-core host: `make test-slow`
def test_two_servers_under_one_key_both_measure(tmp_path):
    workloads = fp32_int8_workloads()
    with LoopbackBoard(key="pair", num_servers=2) as board, LatencyDatabase(tmp_path / "m.sqlite") as db:
        summary = Measurer(board, HOST, db, timing=FAST_TIMING).run(workloads)
    assert summary.measured == len(workloads)
    assert len(summary.workers) == 2 and all(count > 0 for count in summary.workers.values())


@pytest.mark.slow  # about a minute on a 2-core host: `make test-slow`
def test_killing_the_server_mid_measurement_loses_nothing(tmp_path):
    workloads = fp32_int8_workloads()[:3]  # one timed before the kill, one during it, one after
    # Long repeats so that the kill, 1 s after the first result, lands while the next one is being timed.
    slow = TimingConfig(repeat=2, min_repeat_ms=1500, warmup=0)
    events = []
    with (
        LoopbackBoard(key="dies", wait_for_server_s=60) as board,
        LatencyDatabase(tmp_path / "m.sqlite") as db,
    ):

        def kill_then_restart() -> None:
            time.sleep(1.0)
            board.server_processes[0].stop(grace_s=0.1)
            time.sleep(2.0)
            board.start_server()

        def on_event(event) -> None:
            events.append(event)
            if event.status == "ok" and event.done == 1:
                threading.Thread(target=kill_then_restart, daemon=True).start()

        summary = Measurer(board, HOST, db, timing=slow).run(workloads, on_event)
        rows = db.measurements(summary.fingerprint)
    retried = [e for e in events if e.status == "retry"]
    assert retried and "board" in retried[0].error
    assert summary.failed == {}
    assert {m.workload.key for m in rows if m.ok} == {w.key for w in workloads}
    assert max(m.attempts for m in rows) == 2  # the workload being timed at the kill, measured again
    # The workload measured before the kill kept its one attempt (it may have been re-timed at the end of
    # the run, if the quiet gate's canary was slow then, which replaces its row and its time).
    measured_first = next(e for e in events if e.status == "ok").workload
    (first,) = [m for m in rows if m.workload.key == measured_first.key]
    assert first.ok and first.attempts == 1


def test_a_board_that_stays_dead_stops_the_run_and_keeps_what_was_measured(tmp_path):
    workloads = fp32_int8_workloads()
    with (
        LoopbackBoard(key="gone", wait_for_server_s=1) as board,
        LatencyDatabase(tmp_path / "m.sqlite") as db,
    ):

        def kill(event) -> None:
            if event.status == "ok":
                for server in board.server_processes:
                    server.stop(grace_s=0.1)

        measurer = Measurer(board, HOST, db, timing=TimingConfig(repeat=2, min_repeat_ms=5, max_attempts=2))
        with pytest.raises(BoardError, match="rerun to measure the rest"):
            measurer.run(workloads, kill)
        kept = db.latencies(measurer.fingerprint, measurer.schedule)
    assert 1 <= len(kept) < len(workloads)


def run_in_background(measurer, workloads, on_event, outcome: dict) -> threading.Thread:
    """``measurer.run`` on a daemon thread; its summary, or the exception it raised, lands in ``outcome``."""

    def run() -> None:
        try:
            outcome["summary"] = measurer.run(workloads, on_event)
        except Exception as err:
            outcome["error"] = err

    runner = threading.Thread(target=run, daemon=True)
    runner.start()
    return runner


def test_a_tracker_killed_mid_run_stops_it_within_seconds_keeping_what_was_measured(tmp_path):
    # After the first result the test holds the only server, so the worker waits at the tracker for a
    # free one when the tracker is killed: its query fails (BrokenPipeError, OSError), which once killed
    # the worker thread, and the run waited for ever for someone to measure the third workload.
    workloads = fp32_int8_workloads()[:3]
    held, outcome = [], {}
    with LoopbackBoard(key="tracker-dies") as board, LatencyDatabase(tmp_path / "m.sqlite") as db:
        tracker = board.tracker_process.pid
        killed = []

        def kill_tracker() -> None:
            os.killpg(tracker, signal.SIGKILL)
            killed.append(time.monotonic())

        def on_event(event) -> None:
            if event.status == "ok" and not held:
                held.append(board.connect())
                threading.Timer(1.0, kill_tracker).start()

        measurer = Measurer(board, HOST, db, timing=FAST_TIMING, workers=1)
        runner = run_in_background(measurer, workloads, on_event, outcome)
        runner.join(60)
        assert not runner.is_alive(), "the run still waits, 60 s on"
        assert killed and time.monotonic() - killed[0] < 15
        assert isinstance(outcome.get("error"), BoardError), outcome
        assert "RPC tracker" in str(outcome["error"]) and "rerun to measure the rest" in str(outcome["error"])
        kept = db.latencies(measurer.fingerprint, measurer.schedule)
    assert len(kept) == 1


@pytest.mark.slow  # 14-22 s on a 2-core host
def test_a_board_that_stops_answering_mid_run_stops_it_within_twice_the_answer_timeout(tmp_path):
    # The server is SIGSTOPped half a second after the first result, likely while the next workload is
    # timed: the call gets no answer (3 s and the timing's own), then no session opens on it (3 s more).
    workloads = fp32_int8_workloads()[:3]
    timing = TimingConfig(repeat=2, min_repeat_ms=300, warmup=0)
    stopped, outcome = [], {}
    with (
        LoopbackBoard(key="stops", answer_timeout_s=3) as board,
        LatencyDatabase(tmp_path / "m.sqlite") as db,
    ):
        # The server and its popen_workers, not their owner watch (which kills them should this test die).
        (watch,) = [server.pid for server in board.server_processes]
        serving = psutil.Process(watch).children(recursive=True)

        def signal_server(number: signal.Signals) -> None:
            for process in serving:
                process.send_signal(number)

        def stop_server() -> None:
            signal_server(signal.SIGSTOP)
            stopped.append(time.monotonic())

        def on_event(event) -> None:
            if event.status == "ok" and not stopped:
                threading.Timer(0.5, stop_server).start()

        measurer = Measurer(board, HOST, db, timing=timing, workers=1)
        runner = run_in_background(measurer, workloads, on_event, outcome)
        try:
            runner.join(60)
        finally:
            signal_server(signal.SIGCONT)
        assert not runner.is_alive(), "the run still waits, 60 s on"
        assert stopped and time.monotonic() - stopped[0] < 2 * 3 + 5
        assert isinstance(outcome.get("error"), BoardError), outcome
        assert "rerun to measure the rest" in str(outcome["error"])
        kept = db.latencies(measurer.fingerprint, measurer.schedule)
    assert 1 <= len(kept) < len(workloads)


def test_an_unreachable_tracker_fails_fast(tmp_path):
    board = TrackerBoard("127.0.0.1", _free_port("127.0.0.1"), "nobody")
    started = time.monotonic()
    with LatencyDatabase(tmp_path / "m.sqlite") as db, pytest.raises(BoardError, match="cannot reach"):
        Measurer(board, HOST, db, timing=FAST_TIMING).run(fp32_int8_workloads())
    assert time.monotonic() - started < 10


def test_a_hanging_session_is_cut_retried_then_stored_as_failed(tmp_path):
    (workload, *_) = fp32_int8_workloads()
    # Each timing would take a minute; the session may last 1 s: the board kills it, as it would a hang.
    # (A repeat's run count comes from a first estimate of the kernel's time: with 4 s, an estimate
    # inflated by a busy machine once made the whole timing fit in the second, and nothing hung.)
    hangs = TimingConfig(repeat=1, min_repeat_ms=60_000, warmup=0, max_attempts=2, workload_timeout_s=1)
    started = time.monotonic()
    with LoopbackBoard(key="hang") as board, LatencyDatabase(tmp_path / "m.sqlite") as db:
        summary = Measurer(board, HOST, db, timing=hangs).run([workload])
        (row,) = db.measurements(summary.fingerprint)
    assert "after 2 attempts" in summary.failed[workload.key]
    assert (row.status, row.attempts) == ("failed", 2) and row.error == summary.failed[workload.key]
    assert time.monotonic() - started < 30


def test_a_budget_measures_what_the_latency_model_predicts_slowest(loopback_board, tmp_path):
    history = fp32_int8_workloads(models.tiny_cnn())
    new = fp32_int8_workloads(models.conv_model(channels=16, size=16))
    with LatencyDatabase(tmp_path / "m.sqlite") as db:
        measurer = Measurer(loopback_board, HOST, db, timing=FAST_TIMING)
        for workload in history:  # earlier rows of this board: time grows with MACs and tensor size
            ms = 0.001 + 1e-6 * workload.macs + 1e-6 * np.prod(workload.input_shape)
            db.record(measurer.fingerprint, workload, measurer.schedule, LatencyStats((ms,)))
        summary = measurer.run(new, budget=2)
        stored = db.latencies(measurer.fingerprint, measurer.schedule, [w.key for w in new])
    known = {w.key for w in history}
    layers = {w.key for w in new if w.kind == "layer"}
    assert not layers & known and summary.measured == 2
    assert set(stored) - known == layers  # the convs were measured, not the conversions
    assert set(summary.predicted_ms) == {w.key for w in new} - layers - known
    assert all(ms > 0 for ms in summary.predicted_ms.values())
    assert summary.model_mape_percent is not None and summary.model_mape_percent >= 0


def test_a_budget_without_history_measures_in_model_order(loopback_board, tmp_path):
    new = fp32_int8_workloads()
    with LatencyDatabase(tmp_path / "m.sqlite") as db:
        summary = Measurer(loopback_board, HOST, db, timing=FAST_TIMING).run(new, budget=1)
    assert summary.measured == 1 and summary.predicted_ms == {}
