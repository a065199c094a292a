"""Boards over TVM RPC: the loopback host board, a tracker, or a direct server."""

from .boards import Board, LoopbackBoard, ServerBoard, TrackerBoard, open_board, parse_address
from .processes import ProcessGroup, sigterm_as_exit
from .session import BoardSession, LatencyStats, RemoteVM
from .threads import default_threads, host_cores, host_vm, use_host_threads

__all__ = [
    "Board",
    "BoardSession",
    "LatencyStats",
    "LoopbackBoard",
    "ProcessGroup",
    "RemoteVM",
    "ServerBoard",
    "TrackerBoard",
    "default_threads",
    "host_cores",
    "host_vm",
    "open_board",
    "parse_address",
    "sigterm_as_exit",
    "use_host_threads",
]
