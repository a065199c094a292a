"""Boards over TVM RPC: the loopback host board, an emulated aarch64 board, a tracker, or a direct server."""

from .boards import Board, LoopbackBoard, ServerBoard, TrackerBoard, parse_address
from .connection import BoardConnection, open_board
from .deadlines import ANSWER_TIMEOUT_ENV, DEFAULT_ANSWER_TIMEOUT_S
from .emulated import NOT_THE_BOARDS, EmulatedBoard, find_arm_runtime
from .processes import ProcessGroup, Stopped, sigterm_as_exit
from .session import BoardSession, LatencyStats, RemoteVM
from .threads import default_threads, host_cores, host_vm, use_host_threads

__all__ = [
    "ANSWER_TIMEOUT_ENV",
    "DEFAULT_ANSWER_TIMEOUT_S",
    "NOT_THE_BOARDS",
    "Board",
    "BoardConnection",
    "BoardSession",
    "EmulatedBoard",
    "LatencyStats",
    "LoopbackBoard",
    "ProcessGroup",
    "RemoteVM",
    "ServerBoard",
    "Stopped",
    "TrackerBoard",
    "default_threads",
    "find_arm_runtime",
    "host_cores",
    "host_vm",
    "open_board",
    "parse_address",
    "sigterm_as_exit",
    "use_host_threads",
]
