"""External processes owned by a context manager that always cleans up, children included.

TVM's ``rpc_server`` forks ``popen_worker`` children that keep running (and holding pipes) when only the
server process is terminated. Each process started here therefore leads a new session (process group), and
stopping it signals the whole group: SIGTERM first, SIGKILL for whatever is still alive after a grace period.
A group also ends when this process dies without stopping it (SIGKILL, a crash): its leader is
:mod:`.owner_watch`, which runs the command and kills the group once its owner is gone.

SIGTERM and SIGHUP (a closed terminal or a dropped ssh session) raise :class:`Stopped` under
:func:`sigterm_as_exit`, so the ``with`` blocks owning the groups unwind as on Ctrl-C.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import subprocess
import sys
import time
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path

from ..interrupts import interrupt, signal_handled
from .owner_watch import OWNER_ENV

_OWNER_WATCH = str(Path(__file__).with_name("owner_watch.py"))

_LIVE: weakref.WeakSet[ProcessGroup] = weakref.WeakSet()


class ProcessGroup:
    """One command running in a process group of its own, led by :mod:`.owner_watch`.

    Use as a context manager; :meth:`stop` is idempotent and also runs at interpreter exit as a
    safety net for callers that never leave the ``with`` block normally.
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        label: str,
        log_path: str | None = None,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
    ) -> None:
        self.argv = list(argv)
        self.cwd = cwd  # None: this process's
        self.label = label
        self.log_path = log_path
        self.env = env  # None: inherit this process's environment
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        """The group's id: the pid of its leader, the watch that runs the command."""
        if self._proc is None:
            raise RuntimeError(f"{self.label} is not running")
        return self._proc.pid

    def start(self) -> ProcessGroup:
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        try:
            self._proc = subprocess.Popen(
                [sys.executable, _OWNER_WATCH, *self.argv],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**(os.environ if self.env is None else self.env), OWNER_ENV: str(os.getpid())},
                cwd=self.cwd,
            )
        finally:
            if log is not subprocess.DEVNULL:
                log.close()
        _LIVE.add(self)
        return self

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def exit_code(self) -> int | None:
        """The command's exit status (128 + N when signal N ended it); None while it runs."""
        return None if self._proc is None else self._proc.poll()

    def stop(self, grace_s: float = 3.0) -> None:
        """Terminate the process and every process in its group; wait until all are gone."""
        if self._proc is None:
            return
        pgid = self._proc.pid
        _signal_group(pgid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while self._proc.poll() is None or _group_alive(pgid):
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        if _group_alive(pgid):
            _signal_group(pgid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):  # SIGKILL cannot be ignored
            self._proc.wait(timeout=grace_s)
        # A SIGKILLed process is gone only once the kernel has torn it down: wait for that too, so
        # nothing of the group is still running when stop() returns.
        deadline = time.monotonic() + grace_s
        while _group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.02)
        self._proc = None
        _LIVE.discard(self)

    def __enter__(self) -> ProcessGroup:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def _group_alive(pgid: int) -> bool:
    """True while any process of the group still runs; zombies count as gone.

    Orphans of the group are reparented to init, which may reap them a second or more later: signalling
    the group (``killpg(pgid, 0)``) succeeds on those zombies, so it cannot tell a live group from a dead
    one. ``/proc`` can; without it (not Linux) the signal test is the fallback.
    """
    members = _live_group_members(pgid)
    if members is not None:
        return bool(members)
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _live_group_members(pgid: int) -> list[int] | None:
    """PIDs of the group's processes that are not zombies, from ``/proc``; None when there is no ``/proc``."""
    try:
        entries = os.listdir("/proc")
    except OSError:
        return None
    members = []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue  # exited while we looked
        state, group = fields[0], int(fields[2])
        if group == pgid and state not in (b"Z", b"X"):
            members.append(int(entry))
    return members


@atexit.register
def _stop_all() -> None:
    for group in list(_LIVE):
        group.stop(grace_s=1.0)


class Stopped(SystemExit):
    """SIGTERM or SIGHUP arrived under :func:`sigterm_as_exit`; exits with status 128 + the signal."""

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signal_name = signal.Signals(signum).name


def _raise_stopped(signum: int, _frame: object) -> None:
    interrupt(Stopped(signum))


@contextlib.contextmanager
def sigterm_as_exit() -> Iterator[None]:
    """Within the block, SIGTERM and SIGHUP raise :class:`Stopped` (a ``SystemExit``) so every ``with``
    block (trackers, servers, temporary folders) unwinds.

    Python's default action for either kills the interpreter without running cleanup; this makes ``kill``
    and a closed terminal behave like Ctrl-C. Only the main thread may install signal handlers; elsewhere
    this is a no-op.
    """
    with signal_handled(signal.SIGTERM, _raise_stopped), signal_handled(signal.SIGHUP, _raise_stopped):
        yield
