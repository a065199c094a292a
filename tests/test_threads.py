"""TVM's thread count: every physical core, in this process and on the loopback board's servers."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from ohq_tvm.board import LoopbackBoard, default_threads, host_cores
from ohq_tvm.board.threads import THREADS_ENV, thread_environment
from ohq_tvm.oqa.measure import board_fingerprint
from ohq_tvm.targets import host as host_facts
from ohq_tvm.targets import resolve_target


def _topology(root, cores_of: dict[int, tuple[int, int]]) -> None:
    for cpu, (package, core) in cores_of.items():
        folder = root / f"cpu{cpu}" / "topology"
        folder.mkdir(parents=True)
        (folder / "physical_package_id").write_text(f"{package}\n")
        (folder / "core_id").write_text(f"{core}\n")


def test_host_cores_counts_hyperthread_siblings_once(tmp_path, monkeypatch):
    # cpus 0/1 and 2/3 are SMT pairs of package 0; cpu 4 is core 0 of a second package.
    _topology(tmp_path, {0: (0, 0), 1: (0, 0), 2: (0, 1), 3: (0, 1), 4: (1, 0)})
    monkeypatch.setattr(host_facts, "_CPU_TOPOLOGY", tmp_path)
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0, 1, 2, 3, 4})
    assert host_cores() == 3
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {2, 3})  # pinned to one core's two CPUs
    assert host_cores() == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0, 1, 7})  # cpu7: no topology to read
    assert host_cores() == 3


def test_the_host_board_counts_physical_cores():
    assert resolve_target("host").num_cores == host_cores()
    assert 1 <= host_cores() <= (os.cpu_count() or 1)


def _threads_in_fresh_process(env: dict[str, str], cwd) -> int:
    code = "from ohq_tvm.board import use_host_threads; print(use_host_threads())"
    # Run outside the checkout, whose top-level ohq_tvm/ is not the installed package.
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=cwd, capture_output=True, text=True, check=True
    )
    return int(done.stdout.strip())


def test_in_process_runs_use_every_core_unless_the_user_says_otherwise(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in (THREADS_ENV, "OMP_NUM_THREADS")}
    # TVM alone would take half the logical CPUs on x86-64 (one thread on a 2-core machine).
    assert _threads_in_fresh_process(env, tmp_path) == host_cores()
    assert _threads_in_fresh_process({**env, THREADS_ENV: "1"}, tmp_path) == 1


def test_thread_environment_sets_the_count_and_rejects_nonsense():
    assert thread_environment(3, {"PATH": "/bin"}) == {"PATH": "/bin", THREADS_ENV: "3"}
    with pytest.raises(ValueError, match="positive"):
        thread_environment(0)


@pytest.mark.parametrize("threads", [1, 2])
def test_loopback_servers_run_kernels_on_the_threads_asked_for(threads):
    with LoopbackBoard(key=f"threads{threads}", threads=threads) as board:
        assert board.connect().describe()["threads"] == str(threads)


def test_the_thread_count_is_part_of_the_board_fingerprint(loopback_board):
    spec = resolve_target("host")
    device = loopback_board.connect().describe()
    assert device["threads"] == str(default_threads())
    one, _ = board_fingerprint(spec, loopback_board, {**device, "threads": "1"})
    two, _ = board_fingerprint(spec, loopback_board, {**device, "threads": "2"})
    assert one != two
