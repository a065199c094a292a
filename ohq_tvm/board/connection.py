"""Where the board is, as one validated config, and :func:`open_board`, which turns it into a live board."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

from ..errors import BoardError
from ..targets import BoardSpec
from .boards import Board, LoopbackBoard, ServerBoard, TrackerBoard, parse_address
from .emulated import EmulatedBoard, emulation_of


@dataclass(frozen=True)
class BoardConnection:
    """How to reach the board a model is compiled for (the CLI's ``--tracker/--key/--server/--emulated``).

    - ``tracker``: ``HOST:PORT`` of an RPC tracker with the board's servers registered under ``key``;
    - ``server``: ``HOST:PORT`` of one RPC server, no tracker;
    - ``emulated``: the board emulated on this machine (qemu; its runtime in ``arm_runtime`` or
      ``$OHQ_TVM_ARM_RUNTIME``) with ``servers`` servers under a private tracker, or, with ``tracker``,
      emulated servers already registered there (``ohq-tvm board emulate``);
    - none of these: this machine, through a loopback tracker and ``servers`` servers.

    ``key`` defaults to the board's RPC key, ``<key>-emulated`` for its emulated twin, so that a session
    never lands on a real board when an emulated one was meant, or the other way round.
    """

    tracker: str | None = None
    key: str | None = None
    server: str | None = None
    emulated: bool = False
    arm_runtime: str | None = None
    servers: int = 1

    def __post_init__(self) -> None:
        if self.tracker and self.server:
            raise BoardError("give either --tracker or --server, not both")
        if self.tracker:
            parse_address(self.tracker, "--tracker")
        if self.server:
            parse_address(self.server, "--server")
        if self.arm_runtime and not self.emulated:
            raise BoardError("--arm-runtime is for an emulated board: add --emulated")
        if not isinstance(self.servers, int) or self.servers < 1:
            raise BoardError(f"a board needs at least one server, not {self.servers!r}")
        if self.arm_runtime is not None:
            object.__setattr__(self, "arm_runtime", os.fspath(self.arm_runtime))

    @property
    def remote(self) -> bool:
        """Whether the board is reached through something other than this machine's own runtime (a
        tracker, a server, or emulation): then a board of any architecture can run the module."""
        return bool(self.tracker or self.server or self.emulated)

    def key_for(self, spec: BoardSpec) -> str:
        """The RPC key sessions are requested under."""
        if self.key:
            return self.key
        return f"{spec.rpc_key}-emulated" if self.emulated else spec.rpc_key

    def to_json(self) -> dict:
        return asdict(self)


def open_board(connection: BoardConnection | None, spec: BoardSpec) -> Board:
    """The live board ``connection`` describes, for a board of kind ``spec``. Boards started on this
    machine (loopback, emulated) start when first used or entered as a context manager.

    Raises :class:`BoardError` when an emulated board's runtime or qemu is missing, and
    :class:`~ohq_tvm.errors.TargetError` when ``spec`` cannot be emulated.
    """
    connection = connection or BoardConnection()
    key = connection.key_for(spec)
    emulation = emulation_of(spec) if connection.emulated else None
    if connection.tracker:
        host, port = parse_address(connection.tracker, "--tracker")
        return TrackerBoard(host, port, key, emulation=emulation)
    if connection.server:
        host, port = parse_address(connection.server, "--server")
        return ServerBoard(host, port, connection.key or "", emulation=emulation)
    if connection.emulated:
        return EmulatedBoard(spec, connection.arm_runtime, key=key, num_servers=connection.servers)
    return LoopbackBoard(key=key, num_servers=connection.servers)


__all__ = ["BoardConnection", "open_board"]
