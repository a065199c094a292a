"""Emulated ARM boards: TVM's C++ RPC server built for aarch64, run under qemu user mode on this machine.

What emulation proves: the library built for the board loads in a TVM runtime for aarch64, every
instruction in it exists on the board's core (qemu's CPU model faults on one the core lacks, as the
board would), and its outputs are right. What it does not: speed. Emulated code runs 5-65x slower than
natively, unevenly across operators, so an emulated board's latencies say nothing about the board's;
they are stored under a fingerprint of their own and every report says so.

The runtime is a folder holding ``tvm_rpc`` (``apps/cpp_rpc`` of the Apache TVM release matching the
installed one, cross-built for aarch64) and the ``libtvm_*.so`` it loads; qemu is Debian's ``qemu-user``,
and the aarch64 C/C++ libraries come from ``/usr/aarch64-linux-gnu`` (``g++-aarch64-linux-gnu``).
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..errors import BoardError, TargetError
from ..targets import BoardSpec
from .boards import LoopbackBoard
from .session import BoardSession

RUNTIME_ENV = "OHQ_TVM_ARM_RUNTIME"
EMULATOR = "qemu-aarch64"
SYSROOT = Path("/usr/aarch64-linux-gnu")
SERVER = "tvm_rpc"
NOT_THE_BOARDS = "emulated: latencies are not the board's"
_PACKAGES = "Debian's qemu-user and g++-aarch64-linux-gnu (or libc6-arm64-cross libstdc++6-arm64-cross)"
# qemu reports a guest killed by a signal as "qemu: uncaught target signal 4 (Illegal instruction) ...".
_GUEST_SIGNAL = re.compile(r"uncaught target signal (\d+) \(([^)]*)\)")


@dataclass(frozen=True)
class ArmRuntime:
    """What an emulated board runs: the aarch64 RPC server, the emulator, and the aarch64 libraries."""

    server: Path
    emulator: str
    sysroot: Path


def find_arm_runtime(directory: str | os.PathLike | None = None) -> ArmRuntime:
    """The runtime in ``directory``, else in ``$OHQ_TVM_ARM_RUNTIME``; checks qemu and the aarch64 libraries.

    Raises :class:`BoardError` (one line naming the flag, the variable and the packages) when any is missing.
    """
    given = directory or os.environ.get(RUNTIME_ENV)
    if not given:
        raise BoardError(
            f"an emulated board needs TVM's RPC server built for aarch64: pass --arm-runtime DIR or set "
            f"${RUNTIME_ENV} to the folder holding {SERVER} and its libtvm_*.so (docs/boards.md, "
            f"Emulated ARM boards), and install {_PACKAGES}"
        )
    server = Path(given) / SERVER
    if not server.is_file() or not os.access(server, os.X_OK):
        raise BoardError(
            f"{given} holds no executable {SERVER}: --arm-runtime / ${RUNTIME_ENV} must name the folder "
            f"of TVM's aarch64 RPC server and its libtvm_*.so"
        )
    emulator = shutil.which(EMULATOR)
    if emulator is None:
        raise BoardError(f"an emulated board needs {EMULATOR}, which is not on PATH: install {_PACKAGES}")
    if not (SYSROOT / "lib" / "ld-linux-aarch64.so.1").exists():
        raise BoardError(
            f"an emulated board needs the aarch64 C/C++ libraries in {SYSROOT}: install {_PACKAGES}"
        )
    return ArmRuntime(server=server, emulator=emulator, sysroot=SYSROOT)


def emulated_cpu(spec: BoardSpec) -> str:
    """qemu's model of the board's core; :class:`TargetError` for a board that cannot be emulated."""
    if spec.arch != "aarch64":
        raise TargetError(
            f"board {spec.name} is {spec.arch}: only aarch64 boards can be emulated (run an x86 board "
            "as it is: it needs no --emulated)"
        )
    if spec.emulated_cpu is None:
        raise TargetError(
            f"board {spec.name}: qemu has no model of its core {spec.target_config.get('mcpu', '(none)')!r}; "
            'add emulated_cpu = "<nearest qemu core>" to its TOML (e.g. cortex-a76)'
        )
    return spec.emulated_cpu


def emulation_of(spec: BoardSpec, cpu: str | None = None) -> str:
    """How an emulated board is described in labels and stored measurements."""
    return f"{EMULATOR} -cpu {cpu or emulated_cpu(spec)}"


class EmulatedBoard(LoopbackBoard):
    """An aarch64 board emulated on this machine: ``num_servers`` of TVM's C++ RPC servers under
    ``qemu-aarch64 -cpu <the board's core>``, registered under ``key`` at a private tracker (or at
    ``tracker``), all bound to 127.0.0.1 and stopped on :meth:`close`.

    ``cpu`` overrides the board's core (e.g. an older one, to check that a module fails there). Raises
    :class:`BoardError` / :class:`TargetError` when the runtime or qemu is missing or the board has no
    qemu model; :meth:`explain_failure` names a guest signal (an illegal instruction) from the logs.
    """

    def __init__(
        self,
        spec: BoardSpec,
        runtime: ArmRuntime | str | os.PathLike | None = None,
        *,
        key: str | None = None,
        num_servers: int = 1,
        tracker: str | None = None,
        cpu: str | None = None,
        threads: int | None = None,
        wait_for_server_s: float = 60.0,
    ) -> None:
        self.cpu = cpu or emulated_cpu(spec)
        self.runtime = runtime if isinstance(runtime, ArmRuntime) else find_arm_runtime(runtime)
        super().__init__(
            key=key or f"{spec.rpc_key}-emulated",
            num_servers=num_servers,
            wait_for_server_s=wait_for_server_s,
            threads=threads,
            tracker=tracker,
        )
        self.spec = spec
        self.emulation = emulation_of(spec, self.cpu)
        self.label = f"{spec.name} (emulated {self.cpu})"

    def connect(self, session_timeout_s: float = 0) -> BoardSession:
        session = super().connect(session_timeout_s)
        session.label = self.label
        return session

    def server_argv(self, port: int, index: int) -> list[str]:
        work_dir = self.log_dir / f"server{index}-work"
        work_dir.mkdir(parents=True, exist_ok=True)
        return [
            self.runtime.emulator,
            "-cpu",
            self.cpu,
            "-L",
            str(self.runtime.sysroot),
            str(self.runtime.server),
            "server",
            f"--host={self.host}",
            f"--port={port}",
            f"--port-end={port + 10}",
            f"--tracker={self.tracker_address}",
            f"--key={self.key}",
            f"--work-dir={work_dir}",
            "--silent",
        ]

    def explain_failure(self) -> str | None:
        for server in self.server_processes:
            log = Path(server.log_path or "")
            text = log.read_text(errors="replace") if log.is_file() else ""
            found = _GUEST_SIGNAL.findall(text)
            if found:
                number, name = found[-1]
                hint = (
                    f": the module uses an instruction a {self.cpu} lacks (built for a newer core?)"
                    if number == "4"
                    else ""
                )
                return f"the emulated {self.cpu} died of signal {number} ({name}){hint}"
        return None


__all__ = [
    "NOT_THE_BOARDS",
    "RUNTIME_ENV",
    "ArmRuntime",
    "EmulatedBoard",
    "emulated_cpu",
    "emulation_of",
    "find_arm_runtime",
]
