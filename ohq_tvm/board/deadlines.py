"""How long a tracker or a board may take to answer, and :func:`within`, which holds a blocking call to it.

TVM's RPC client waits for an answer for ever: a peer that accepted the TCP connection and then stopped
(a hung or SIGSTOPped server, a frozen board, something that is not an RPC server at all) would hang the
caller for good. So every wait on a peer has a deadline, the *answer timeout*: the RPC handshake, each
query to a tracker, the wait for a free server, and each call in a session (a call that runs for a known
time, such as a timing, gets that time on top). Its default is :data:`DEFAULT_ANSWER_TIMEOUT_S`,
``$OHQ_TVM_BOARD_TIMEOUT_S`` overrides it for every command, and boards take it as an argument.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import threading
from collections.abc import Callable
from typing import TypeVar

from ..errors import BoardError

ANSWER_TIMEOUT_ENV = "OHQ_TVM_BOARD_TIMEOUT_S"
DEFAULT_ANSWER_TIMEOUT_S = 10.0
T = TypeVar("T")

# What each call past its deadline keeps alive until it returns, by the thread it runs on (see _keep).
_KEPT: dict[threading.Thread, tuple[object, ...]] = {}
_KEPT_LOCK = threading.Lock()


def resolve_answer_timeout(given: float | None = None) -> float:
    """``given``, else ``$OHQ_TVM_BOARD_TIMEOUT_S``, else :data:`DEFAULT_ANSWER_TIMEOUT_S` (seconds).

    Raises :class:`BoardError` naming the variable when it is not a positive number.
    """
    if given is None:
        text = os.environ.get(ANSWER_TIMEOUT_ENV, "").strip()
        try:
            given = float(text) if text else DEFAULT_ANSWER_TIMEOUT_S
        except ValueError:
            raise BoardError(f"${ANSWER_TIMEOUT_ENV} must be a number of seconds, not {text!r}") from None
    if not given > 0:
        raise BoardError(
            f"the answer timeout of a board must be positive, not {given!r} (${ANSWER_TIMEOUT_ENV})"
        )
    return float(given)


def within(deadline_s: float, what: str, action: Callable[[], T], holding: object = None) -> T:
    """Run ``action`` (a blocking RPC call with no deadline of its own) for at most ``deadline_s``.

    Past it, :class:`BoardError` naming ``what``; the call is left to finish on a daemon thread (TVM offers
    no way to cancel it), and until it does, ``holding`` (the RPC session the call is on) and the error
    raised, with the frames it unwinds and the remote objects they hold, are kept (see :func:`_keep`).
    Exceptions of ``action`` are raised here as they are. Waiting here is interruptible (Ctrl-C,
    SIGTERM), unlike a call TVM blocks in.
    """
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["value"] = action()
        except BaseException as err:  # handed to the caller's thread
            outcome["error"] = err
        finally:
            with _KEPT_LOCK:
                kept = _KEPT.pop(threading.current_thread(), ())
            del kept  # the connection is free again: what the call kept may go (here, or with its holders)

    worker = threading.Thread(target=run, daemon=True, name=f"ohq-tvm {what}")
    worker.start()
    worker.join(deadline_s)
    if worker.is_alive():
        error = BoardError(
            f"{what}: no answer within {deadline_s:.0f} s (the peer accepted the connection but never "
            f"replied: is it stopped, hung, or not a TVM RPC server? ${ANSWER_TIMEOUT_ENV} sets the limit)"
        )
        _keep(worker, error, holding)
        raise error
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"]  # type: ignore[return-value]


def _keep(call: threading.Thread, *objects: object) -> None:
    """Keep ``objects`` while ``call`` (a thread blocked in an RPC call) runs, and for good at exit.

    While a call on an RPC session waits for its answer, it holds the session's connection; destroying
    any object of that session (the session, a module, a tensor: each frees its remote handle over the
    connection) then waits for the call inside the destructor, holding the GIL, and every thread of the
    process stops with it. So nothing that may hold the session's objects (the session, and the error
    raised for the call, which keeps the frames it unwinds and their locals) is freed before the call
    returns; at exit, what is still kept is never freed (the interpreter would never end).
    """
    with _KEPT_LOCK:
        if call.is_alive():
            _KEPT[call] = objects


@atexit.register
def _never_free_what_is_kept() -> None:
    with _KEPT_LOCK:
        for objects in _KEPT.values():
            for obj in objects:
                ctypes.pythonapi.Py_IncRef(ctypes.py_object(obj))


__all__ = ["ANSWER_TIMEOUT_ENV", "DEFAULT_ANSWER_TIMEOUT_S", "resolve_answer_timeout", "within"]
