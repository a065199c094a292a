"""Boards over TVM RPC: the loopback host board, a tracker, or a direct server."""

from .boards import Board, LoopbackBoard, ServerBoard, TrackerBoard, open_board, parse_address
from .processes import ProcessGroup, sigterm_as_exit
from .session import BoardSession, LatencyStats, RemoteVM

__all__ = [
    "Board",
    "BoardSession",
    "LatencyStats",
    "LoopbackBoard",
    "ProcessGroup",
    "RemoteVM",
    "ServerBoard",
    "TrackerBoard",
    "open_board",
    "parse_address",
    "sigterm_as_exit",
]
