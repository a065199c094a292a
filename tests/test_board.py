"""Boards over RPC: loopback lifecycle (no process left behind), direct servers, and clear failures."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import psutil
import pytest

from ohq_tvm.board import (
    ANSWER_TIMEOUT_ENV,
    BoardConnection,
    LoopbackBoard,
    ProcessGroup,
    ServerBoard,
    TrackerBoard,
    open_board,
    parse_address,
)
from ohq_tvm.board.boards import _free_port
from ohq_tvm.board.processes import _live_group_members
from ohq_tvm.errors import BoardError
from ohq_tvm.targets import resolve_target

from testing_support import gone, new_tvm_exec_processes, silent_peer, tvm_exec_processes


def _children(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


def _process_tree(pids: list[int]) -> set[int]:
    tree = set(pids)
    for pid in pids:
        tree.update(child.pid for child in psutil.Process(pid).children(recursive=True))
    return tree


def test_loopback_board_leaves_no_process_behind(add_library):
    before = tvm_exec_processes()
    board = LoopbackBoard(key="leakcheck", num_servers=2).start()
    try:
        owned = _process_tree(board.pids())
        # tracker + 2 servers, and each server forks popen_worker children of its own.
        assert len(board.pids()) == 3
        assert len(owned) > 3
        vm = board.connect().load_vm(add_library)
        x = np.arange(16, dtype="float32").reshape(4, 4)
        doubled, squared = vm.run([x])
        np.testing.assert_array_equal(doubled, 2 * x)
        np.testing.assert_array_equal(squared, x * x)
    finally:
        board.close()
    assert all(gone(pid) for pid in owned), [pid for pid in owned if not gone(pid)]
    assert not new_tvm_exec_processes(before)


def _tracker_argv() -> list[str]:
    port = _free_port("127.0.0.1")
    ports = ["--port", str(port), "--port-end", str(port + 1)]
    return [sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", "127.0.0.1", *ports, "--silent"]


def test_the_leak_check_counts_only_this_process_s_boards():
    # Another run's RPC tracker, started after the check's snapshot, is none of this test's business; a
    # group this process started and did not stop is a leak.
    before = tvm_exec_processes()
    others = subprocess.Popen(_tracker_argv())
    ours = ProcessGroup(_tracker_argv(), label="leak").start()
    try:
        deadline = time.monotonic() + 10
        while len(new_tvm_exec_processes(before)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        leaked = new_tvm_exec_processes(before)
        assert others.poll() is None and ours.alive()  # both trackers run
        assert others.pid not in leaked
        assert ours.pid in leaked and len(leaked) == 2, leaked  # the owner watch and the tracker it runs
    finally:
        ours.stop(grace_s=1.0)
        others.kill()
        others.wait()
    assert not new_tvm_exec_processes(before)


def test_loopback_board_cleans_up_when_the_block_raises():
    with pytest.raises(ZeroDivisionError), LoopbackBoard(key="raises") as board:
        owned = _process_tree(board.pids())
        1 / 0  # noqa: B018
    assert owned and all(gone(pid) for pid in owned)


def test_stopping_a_group_waits_for_members_that_ignore_sigterm():
    # The child ignores SIGTERM and is orphaned when its shell dies: stop() must SIGKILL it and return
    # only once it is no longer running (zombies awaiting init count as gone). The group: the owner
    # watch, the shell and its sleep.
    script = "trap '' TERM; sleep 60 & echo $!; wait"
    group = ProcessGroup(["sh", "-c", script], label="stubborn").start()
    pgid = group.pid
    deadline = time.monotonic() + 5
    while len(_live_group_members(pgid)) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(_live_group_members(pgid)) == 3
    started = time.monotonic()
    group.stop(grace_s=0.5)
    assert _live_group_members(pgid) == []
    assert time.monotonic() - started < 3


def test_sigterm_to_the_owner_stops_its_rpc_processes(tmp_path):
    script = textwrap.dedent("""
        import sys, time, psutil
        from ohq_tvm.board import LoopbackBoard, sigterm_as_exit
        with sigterm_as_exit(), LoopbackBoard(key="sigterm") as board:
            pids = set(board.pids())
            for pid in board.pids():
                pids.update(c.pid for c in psutil.Process(pid).children(recursive=True))
            print(" ".join(map(str, sorted(pids))), flush=True)
            time.sleep(120)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        owned = [int(p) for p in proc.stdout.readline().split()]
        assert len(owned) >= 3
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    finally:
        proc.kill()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not all(gone(pid) for pid in owned):
        time.sleep(0.1)
    assert all(gone(pid) for pid in owned), [pid for pid in owned if not gone(pid)]


def test_board_times_a_module(loopback_board, add_library):
    vm = loopback_board.connect().load_vm(add_library)
    stats = vm.time([np.ones((4, 4), "float32")], repeat=3, min_repeat_ms=5)
    assert len(stats.repeats_ms) == 3
    assert 0 < stats.min_ms <= stats.median_ms < 5.0
    assert stats.spread_ms >= 0


def test_direct_server_board_without_tracker(add_library):
    port = _free_port("127.0.0.1")
    argv = [
        sys.executable,
        "-m",
        "tvm.exec.rpc_server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--port-end",
        str(port + 1),
        "--silent",
    ]
    with ProcessGroup(argv, label="direct rpc server"):
        deadline = time.monotonic() + 30
        while True:
            try:
                session = ServerBoard("127.0.0.1", port).connect()
                break
            except BoardError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        (doubled, _) = session.load_vm(add_library).run([np.full((4, 4), 3, "float32")])
        assert float(doubled[0, 0]) == 6.0


def test_unreachable_tracker_fails_within_seconds():
    port = _free_port("127.0.0.1")
    started = time.monotonic()
    with pytest.raises(BoardError, match=rf"cannot reach the RPC tracker at 127\.0\.0\.1:{port}"):
        TrackerBoard("127.0.0.1", port, "rpi4b").connect()
    assert time.monotonic() - started < 10


@pytest.mark.parametrize("make_board", [TrackerBoard, ServerBoard], ids=["tracker", "server"])
def test_a_peer_that_never_answers_is_an_error_within_the_answer_timeout(monkeypatch, make_board):
    monkeypatch.setenv(ANSWER_TIMEOUT_ENV, "1.5")
    with silent_peer() as port:
        board = make_board("127.0.0.1", port, "host")
        started = time.monotonic()
        with pytest.raises(BoardError, match=rf"127\.0\.0\.1:{port}.*no answer within 2 s"):
            board.connect()
        assert time.monotonic() - started < 5


def test_a_board_that_stops_answering_mid_session_is_an_error_within_the_answer_timeout(
    loopback_board, add_library
):
    host, port = parse_address(loopback_board.tracker_address, "tracker")
    board = TrackerBoard(host, port, loopback_board.key, answer_timeout_s=1.5)
    vm = board.connect().load_vm(add_library)
    # The servers and their popen_workers, not their owner watches (which kill them should this test die).
    serving = [child for server in loopback_board.server_processes for child in _children(server.pid)]
    for process in serving:
        process.send_signal(signal.SIGSTOP)  # its kernel still accepts connections; nothing answers

    def wake() -> None:
        for process in serving:
            process.send_signal(signal.SIGCONT)

    # Woken after 8 s whatever happens, so that a call without a deadline fails the test, not hangs it.
    timer = threading.Timer(8.0, wake)
    timer.start()
    try:
        started = time.monotonic()
        with pytest.raises(BoardError, match=rf"board host@{host}:{port}: .*no answer within 2 s"):
            vm.run([np.ones((4, 4), "float32")])
        assert time.monotonic() - started < 5
    finally:
        timer.cancel()
        wake()


def test_missing_key_names_the_keys_that_exist(loopback_board):
    host, port = parse_address(loopback_board.tracker_address, "tracker")
    board = TrackerBoard(host, port, "rpi4b", wait_for_server_s=0.5)
    with pytest.raises(BoardError) as err:
        board.connect()
    assert "'rpi4b'" in str(err.value) and "host" in str(err.value)


def test_server_that_dies_mid_session_is_a_board_error(add_library):
    with LoopbackBoard(key="dies") as board:
        vm = board.connect().load_vm(add_library)
        # The server keeps the uploaded library in its session folder, inside the board's own.
        (uploaded,) = (board.log_dir / "server-tmp").glob(f"*/{os.path.basename(add_library)}")
        for server in board.server_processes:
            os.killpg(server.pid, signal.SIGKILL)
        time.sleep(0.3)
        with pytest.raises(BoardError, match=r"board dies@127\.0\.0\.1:\d+: .* failed"):
            vm.run([np.ones((4, 4), "float32")])
    # A killed server never deletes its session folder: closing the board does.
    assert not uploaded.exists() and not board.log_dir.exists()


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        ("127.0.0.1:9190", ("127.0.0.1", 9190)),
        ("board.local:1", ("board.local", 1)),
        ("nohost", None),
        (":9190", None),
        ("h:99999", None),
        ("h:port", None),
    ],
)
def test_parse_address(text, ok):
    if ok is None:
        with pytest.raises(BoardError, match="HOST:PORT"):
            parse_address(text, "--tracker")
    else:
        assert parse_address(text, "--tracker") == ok


def test_open_board_chooses_from_configuration():
    host, rpi4b = resolve_target("host"), resolve_target("rpi4b")
    assert isinstance(open_board(None, host), LoopbackBoard)
    tracker = open_board(BoardConnection(tracker="10.0.0.2:9190"), rpi4b)
    assert isinstance(tracker, TrackerBoard) and tracker.key == "rpi4b" and tracker.emulation is None
    emulated = open_board(BoardConnection(tracker="10.0.0.2:9190", emulated=True), rpi4b)
    assert emulated.key == "rpi4b-emulated" and emulated.emulation == "qemu-aarch64 -cpu cortex-a72"
    assert isinstance(open_board(BoardConnection(server="127.0.0.1:9090"), host), ServerBoard)
    with pytest.raises(BoardError, match="either --tracker or --server"):
        BoardConnection(tracker="a:1", server="b:2")
    with pytest.raises(BoardError, match="HOST:PORT"):
        BoardConnection(tracker="nope")
    with pytest.raises(BoardError, match="add --emulated"):
        BoardConnection(arm_runtime="/somewhere")
    with pytest.raises(BoardError, match="at least one server"):
        BoardConnection(servers=0)
