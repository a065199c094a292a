"""Boards reached over TVM RPC: one interface, four ways in.

- :class:`TrackerBoard`: servers registered under a key at an RPC tracker (real boards).
- :class:`ServerBoard`: one RPC server addressed directly, no tracker.
- :class:`LoopbackBoard`: this machine; starts its own tracker and server on 127.0.0.1 and stops them on exit.
- :class:`~.emulated.EmulatedBoard`: an aarch64 board emulated on this machine (qemu), started the same way.

Which one is used is decided once, by :func:`~.connection.open_board`, from a
:class:`~.connection.BoardConnection`.
A board whose timings are not the real board's (emulated) says so in :attr:`Board.emulation`.
"""

from __future__ import annotations

import math
import shutil
import socket
import sys
import tempfile
import time
from abc import ABC, abstractmethod
from pathlib import Path

from tvm import rpc

from ..errors import BoardError
from .deadlines import resolve_answer_timeout, within
from .processes import ProcessGroup
from .session import BoardSession
from .threads import default_threads, thread_environment

_TRACKER_CONNECT_TIMEOUT_S = 5.0


def parse_address(text: str, what: str) -> tuple[str, int]:
    """``"host:port"`` → ``(host, port)``; :class:`BoardError` naming ``what`` when malformed."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise BoardError(f"{what} {text!r} is not of the form HOST:PORT (e.g. 127.0.0.1:9190)")
    return host, int(port)


def _require_reachable(host: str, port: int, what: str, fix: str) -> None:
    """Fail within seconds when nothing listens at host:port (TVM's own client retries for a minute)."""
    try:
        with socket.create_connection((host, port), timeout=_TRACKER_CONNECT_TIMEOUT_S):
            pass
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise BoardError(f"cannot reach {what} at {host}:{port} ({reason}); {fix}") from None


def whole_seconds(timeout_s: float) -> int:
    """A session timeout as the RPC servers accept it: stock ``tvm_rpc`` (TVM's C++ server) aborts on a
    fractional ``-timeout``, so it is rounded up to whole seconds (0 stays "no limit")."""
    return max(0, math.ceil(timeout_s))


class Board(ABC):
    """A device that runs compiled modules, reached over TVM RPC."""

    label: str
    # What emulates the board, when it is emulated (e.g. "qemu-aarch64 -cpu cortex-a76"): its latencies
    # are then not the real board's, and its measurements are stored apart. None for a real board.
    emulation: str | None = None
    # How long an answer of the board (or its tracker) is awaited at most (see .deadlines); None: no limit.
    answer_timeout_s: float | None = None

    @abstractmethod
    def connect(self, session_timeout_s: float = 0) -> BoardSession:
        """Open an RPC session on the board. Raises :class:`BoardError` if it cannot be reached."""

    def rpc_tracker(self) -> tuple[str, int, str]:
        """``(host, port, key)`` of the RPC tracker that hands out sessions on this board.

        For tools that request their own sessions, such as MetaSchedule's RPC runner. Raises
        :class:`BoardError` when the board has no tracker or its tracker cannot be reached.
        """
        raise BoardError(
            f"board {self.label} is a bare RPC server, but tuning requests its sessions through an RPC "
            "tracker: start one (`python -m tvm.exec.rpc_tracker`), register the server with "
            "`--tracker HOST:PORT --key KEY`, and pass --tracker HOST:PORT --key KEY instead of --server"
        )

    def close(self) -> None:  # noqa: B027 - a no-op is the right default for remote boards
        """Release what the board owns (nothing, unless it started processes)."""

    def explain_failure(self) -> str | None:
        """Why the board failed, when it can tell more than the RPC error (a board that owns its servers
        reads their logs); ``None`` otherwise."""
        return None

    def capacity(self) -> int:
        """How many sessions can run at once (servers available under the board's key)."""
        return 1

    @property
    def identity(self) -> str:
        """What names the board in stored results: its RPC key (or address, for a bare server)."""
        return getattr(self, "key", "") or self.label

    def __enter__(self) -> Board:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class TrackerBoard(Board):
    """Servers registered under ``key`` at the tracker ``host:port``.

    Every answer of the tracker and of a server is awaited at most ``answer_timeout_s`` (default
    :func:`~.deadlines.resolve_answer_timeout`), and a free server ``wait_for_server_s`` (default the same).
    """

    def __init__(
        self,
        host: str,
        port: int,
        key: str,
        wait_for_server_s: float | None = None,
        emulation: str | None = None,
        answer_timeout_s: float | None = None,
    ) -> None:
        self.host, self.port, self.key = host, port, key
        self.answer_timeout_s = resolve_answer_timeout(answer_timeout_s)
        self.wait_for_server_s = self.answer_timeout_s if wait_for_server_s is None else wait_for_server_s
        self.emulation = emulation
        self.label = f"{key}@{host}:{port}" + (" (emulated)" if emulation else "")

    def _tracker(self) -> rpc.TrackerSession:
        fix = "start one with `python -m tvm.exec.rpc_tracker` or correct --tracker"
        _require_reachable(self.host, self.port, "the RPC tracker", fix)
        try:
            return within(
                self.answer_timeout_s,
                f"RPC tracker at {self.host}:{self.port}",
                lambda: rpc.connect_tracker(self.host, self.port),
            )
        except (RuntimeError, OSError) as err:
            raise BoardError(f"RPC tracker at {self.host}:{self.port} failed: {err}") from None

    def _queue(self, tracker: rpc.TrackerSession) -> dict:
        """The tracker's servers by key; a tracker that died or went silent is a :class:`BoardError`."""
        try:
            summary = within(
                self.answer_timeout_s, f"RPC tracker at {self.host}:{self.port}", tracker.summary
            )
        except (RuntimeError, OSError) as err:  # e.g. BrokenPipeError: the tracker was killed
            reason = str(err).strip() or type(err).__name__
            raise BoardError(f"RPC tracker at {self.host}:{self.port} failed: {reason}") from None
        return summary.get("queue_info", {})

    def free_servers(self) -> int:
        """How many servers under this board's key are idle right now."""
        queue = self._queue(self._tracker())
        return int(queue.get(self.key, {}).get("free", 0))

    def capacity(self) -> int:
        self.wait_until_ready()
        return max(1, self.free_servers())

    def wait_until_ready(self) -> None:
        """Block until a server under the key is registered; :class:`BoardError` after the timeout."""
        tracker = self._tracker()
        deadline = time.monotonic() + self.wait_for_server_s
        while True:
            queue = self._queue(tracker)
            if queue.get(self.key, {}).get("free", 0) > 0:
                return
            if time.monotonic() > deadline:
                known = ", ".join(sorted(queue)) or "none"
                raise BoardError(
                    f"board {self.label}: no idle RPC server under key {self.key!r} after "
                    f"{self.wait_for_server_s:.0f} s (keys with servers: {known}); start one with "
                    f"`python -m tvm.exec.rpc_server --tracker {self.host}:{self.port} --key {self.key}`"
                )
            time.sleep(0.2)

    def rpc_tracker(self) -> tuple[str, int, str]:
        self.wait_until_ready()
        return self.host, self.port, self.key

    def connect(self, session_timeout_s: float = 0) -> BoardSession:
        self.wait_until_ready()
        tracker = self._tracker()
        try:
            # The tracker may keep a request waiting while every server is busy: the deadline covers
            # that wait plus the handshake with the server it hands out.
            remote = within(
                max(self.answer_timeout_s, self.wait_for_server_s),
                f"board {self.label}: session request",
                lambda: tracker.request(
                    self.key, priority=1, session_timeout=whole_seconds(session_timeout_s), max_retry=3
                ),
            )
        except (RuntimeError, OSError) as err:
            raise BoardError(f"board {self.label}: session request failed: {err}") from None
        return BoardSession(remote, self.label, self.explain_failure, call_timeout_s=self.answer_timeout_s)


class ServerBoard(Board):
    """A single RPC server addressed directly (``python -m tvm.exec.rpc_server`` without a tracker)."""

    def __init__(
        self,
        host: str,
        port: int,
        key: str = "",
        emulation: str | None = None,
        answer_timeout_s: float | None = None,
    ) -> None:
        self.host, self.port, self.key = host, port, key
        self.emulation = emulation
        self.answer_timeout_s = resolve_answer_timeout(answer_timeout_s)
        self.label = f"{host}:{port}" + (" (emulated)" if emulation else "")

    def connect(self, session_timeout_s: float = 0) -> BoardSession:
        fix = "start it with `python -m tvm.exec.rpc_server` or correct --server"
        _require_reachable(self.host, self.port, "the RPC server", fix)
        timeout = whole_seconds(session_timeout_s)
        try:
            remote = within(
                self.answer_timeout_s,
                f"RPC server at {self.host}:{self.port}",
                lambda: rpc.connect(self.host, self.port, self.key, session_timeout=timeout),
            )
        except (RuntimeError, OSError) as err:
            raise BoardError(f"RPC server at {self.label} refused the session: {err}") from None
        return BoardSession(remote, self.label, call_timeout_s=self.answer_timeout_s)


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class LoopbackBoard(Board):
    """This machine as a board: a private tracker plus ``num_servers`` RPC servers, bound to ``host``,
    each running kernels on ``threads`` threads (default: :func:`.threads.default_threads`).

    With ``tracker`` (``"HOST:PORT"``) the servers register at that tracker instead of a private one, so
    several boards (the host and emulated ones) can share a tracker under their own keys. Once started, it
    waits for answers and free servers as a :class:`TrackerBoard` does (``answer_timeout_s``,
    ``wait_for_server_s``: default :func:`~.deadlines.resolve_answer_timeout`).

    The processes run until :meth:`close` (or the end of the ``with`` block, an exception, or interpreter
    exit); each is its own process group, so the servers' forked workers go with them.
    """

    def __init__(
        self,
        key: str = "host",
        num_servers: int = 1,
        host: str = "127.0.0.1",
        wait_for_server_s: float | None = None,
        threads: int | None = None,
        tracker: str | None = None,
        answer_timeout_s: float | None = None,
    ) -> None:
        self.key = key
        self.threads = threads or default_threads()  # TVM's own: half the cores on x86 (see .threads)
        self.answer_timeout_s = resolve_answer_timeout(answer_timeout_s)
        self.wait_for_server_s = self.answer_timeout_s if wait_for_server_s is None else wait_for_server_s
        self.host = host
        self.num_servers = num_servers
        self.log_dir = Path(tempfile.mkdtemp(prefix="ohq-tvm-rpc-"))  # tracker/server logs, for errors
        self.shared_tracker = parse_address(tracker, "--tracker") if tracker else None
        self.tracker_host, self.tracker_port = self.shared_tracker or (host, 0)
        self.tracker_process: ProcessGroup | None = None
        self.server_processes: list[ProcessGroup] = []
        self._tracker_board: TrackerBoard | None = None
        self.label = f"{key} (loopback)"

    @property
    def tracker_address(self) -> str:
        return f"{self.tracker_host}:{self.tracker_port}"

    def start(self) -> LoopbackBoard:
        if self._tracker_board is not None:
            return self
        self.log_dir.mkdir(parents=True, exist_ok=True)
        try:
            if self.shared_tracker is None:
                self._start_tracker()
            else:
                fix = "start one with `python -m tvm.exec.rpc_tracker` or correct --tracker"
                _require_reachable(self.tracker_host, self.tracker_port, "the RPC tracker", fix)
            for index in range(self.num_servers):
                self.start_server(index)
            # Starting servers may take longer than a session may wait for a free one later.
            board = TrackerBoard(
                self.tracker_host,
                self.tracker_port,
                self.key,
                max(30.0, self.wait_for_server_s),
                emulation=self.emulation,
                answer_timeout_s=self.answer_timeout_s,
            )
            self._wait_for_servers(board)
            board.wait_for_server_s = self.wait_for_server_s
            self._tracker_board = board
        except BaseException:
            self.close()
            raise
        return self

    def _start_tracker(self) -> None:
        self.tracker_port = _free_port(self.host)
        self.tracker_process = ProcessGroup(
            [
                sys.executable,
                "-m",
                "tvm.exec.rpc_tracker",
                "--host",
                self.host,
                "--port",
                str(self.tracker_port),
                "--port-end",
                str(self.tracker_port + 1),
                "--silent",
            ],
            label="rpc tracker",
            log_path=str(self.log_dir / "tracker.log"),
        ).start()
        self._wait_for_port(self.tracker_port, self.tracker_process)

    def _wait_for_servers(self, board: TrackerBoard) -> None:
        """Until a server is registered; a server that exits at start is an error naming its log."""
        deadline = time.monotonic() + board.wait_for_server_s
        while board.free_servers() == 0:
            dead = [server for server in self.server_processes if not server.alive()]
            if dead or time.monotonic() > deadline:
                board.wait_for_server_s = 0.0
                if dead:
                    log = Path(dead[0].log_path or "").read_text(errors="replace")[-400:].strip()
                    raise BoardError(f"board {self.label}: {dead[0].label} exited at start: {log}")
                board.wait_until_ready()  # raises, naming the keys the tracker has
            time.sleep(0.2)

    def server_argv(self, port: int, index: int) -> list[str]:
        """The command of one RPC server listening on ``port`` and registering under the board's key."""
        return [
            sys.executable,
            "-m",
            "tvm.exec.rpc_server",
            "--host",
            self.host,
            "--port",
            str(port),
            "--port-end",
            str(port + 1),
            "--tracker",
            self.tracker_address,
            "--key",
            self.key,
            "--silent",
        ]

    def start_server(self, index: int | None = None) -> ProcessGroup:
        """Start one more RPC server under this board's key (also used to replace a dead one)."""
        index = len(self.server_processes) if index is None else index
        port = _free_port(self.host)
        server = ProcessGroup(
            self.server_argv(port, index),
            label=f"rpc server {index}",
            log_path=str(self.log_dir / f"server{index}.log"),
            env=self._server_environment(),
            cwd=str(self.log_dir),  # where a crashing server may leave a core file: removed by close()
        ).start()
        self.server_processes.append(server)
        return server

    def _server_environment(self) -> dict[str, str]:
        """The servers' thread count, and their temporary folder inside this board's: a server keeps
        each session's uploaded libraries in a folder it deletes when the session ends well, never when
        the server is killed or the session dies, so :meth:`close` deletes them all with the logs."""
        scratch = self.log_dir / "server-tmp"
        scratch.mkdir(parents=True, exist_ok=True)
        return {**thread_environment(self.threads), "TMPDIR": str(scratch)}

    def _wait_for_port(self, port: int, process: ProcessGroup, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not process.alive():
                log = (self.log_dir / "tracker.log").read_text(errors="replace")[-400:]
                raise BoardError(f"loopback {process.label} exited at start: {log.strip()}")
            try:
                with socket.create_connection((self.host, port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.1)
        raise BoardError(f"loopback {process.label} did not listen on {self.host}:{port}")

    def connect(self, session_timeout_s: float = 0) -> BoardSession:
        self.start()
        assert self._tracker_board is not None
        session = self._tracker_board.connect(session_timeout_s)
        session.explain = self.explain_failure
        return session

    def rpc_tracker(self) -> tuple[str, int, str]:
        self.start()
        return self.tracker_host, self.tracker_port, self.key

    def capacity(self) -> int:
        return max(1, sum(1 for server in self.server_processes if server.alive()) or self.num_servers)

    def pids(self) -> list[int]:
        """PIDs of the processes this board started and still owns (for leak checks)."""
        groups = [self.tracker_process, *self.server_processes]
        return [group.pid for group in groups if group is not None and group.alive()]

    def close(self) -> None:
        # Nothing in these processes needs flushing: SIGTERM, and SIGKILL after a second for anything
        # that ignores it.
        for server in self.server_processes:
            server.stop(grace_s=1.0)
        self.server_processes.clear()
        if self.tracker_process is not None:
            self.tracker_process.stop(grace_s=1.0)
            self.tracker_process = None
        self._tracker_board = None
        shutil.rmtree(self.log_dir, ignore_errors=True)

    def __enter__(self) -> LoopbackBoard:
        return self.start()
