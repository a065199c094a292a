"""Ctrl-C that survives TVM's FFI.

A ``KeyboardInterrupt`` raised while Python code runs inside a call from TVM's C++ (our Relax passes and
schedule rules run inside ``relax.build``'s pipeline) comes back out of the FFI as a bare ``RuntimeError``
with no message, which code catching a failed build or a failed board step would take for one. While
:func:`watch_interrupts` is active, SIGINT also sets a flag, and those ``except`` paths call
:func:`reraise_interrupt` first, so an interrupted run stops instead of recording a failure. A SIGINT
that lands in a finalizer (TVM deletes its temporary folders in ``__del__``) is dropped by Python with a
printed warning; long loops call :func:`reraise_interrupt` between steps so the run still stops. The
same holds for SIGTERM and SIGHUP, whose handlers (:func:`ohq_tvm.board.sigterm_as_exit`) raise through
:func:`interrupt`.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

_INTERRUPTED = threading.Event()
_PENDING: list[BaseException] = []  # what the signal raised, raised again by reraise_interrupt


def interrupt(error: BaseException) -> NoReturn:
    """Raise ``error`` from a signal handler, remembered for :func:`reraise_interrupt` under
    :func:`watch_interrupts`."""
    _PENDING[:] = [error]
    _INTERRUPTED.set()
    raise error


def _on_sigint(_signum: int, _frame: object) -> None:
    interrupt(KeyboardInterrupt())


@contextmanager
def signal_handled(signum: int, handler) -> Iterator[None]:
    """Within the block, ``handler`` handles ``signum``; the previous handler is restored after. Only the
    main thread may install signal handlers; elsewhere this is a no-op."""
    try:
        previous = signal.signal(signum, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signum, previous)


@contextmanager
def watch_interrupts() -> Iterator[None]:
    """Within the block, SIGINT raises ``KeyboardInterrupt`` as usual and is remembered for
    :func:`reraise_interrupt` (see :func:`signal_handled` for threads)."""
    _INTERRUPTED.clear()
    try:
        with signal_handled(signal.SIGINT, _on_sigint):
            yield
    finally:
        _INTERRUPTED.clear()
        _PENDING.clear()


def reraise_interrupt() -> None:
    """Raise ``KeyboardInterrupt`` again if SIGINT arrived under :func:`watch_interrupts` (the signal's own
    exception for SIGTERM and SIGHUP: see :func:`interrupt`). Call it first in an ``except`` that would
    otherwise take an interrupt turned ``RuntimeError`` by TVM for a failure."""
    if _INTERRUPTED.is_set():
        raise _PENDING[0] if _PENDING else KeyboardInterrupt()


__all__ = ["interrupt", "reraise_interrupt", "signal_handled", "watch_interrupts"]
