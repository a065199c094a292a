"""C++ toolchains that link exported modules: the native one, Debian's GNU cross g++, or zig.

Debian's ``<triple>-g++`` is preferred when installed (the conventional toolchain); otherwise the
``ziglang`` wheel cross-links with no root and no apt. ``OHQ_TVM_CXX`` overrides both with a command line.
"""

from __future__ import annotations

import importlib.util
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..errors import BuildError
from ..targets.host import arch_of, machine_arch


def host_arch() -> str:
    """Normalised architecture of this machine (``x86_64``, ``aarch64``, ...)."""
    return machine_arch()


def triple_arch(triple: str) -> str:
    """Normalised architecture of a target triple (``armv7l-linux-gnueabihf`` → ``arm``)."""
    return arch_of(triple)


def _zig_triple(triple: str) -> str:
    """zig spells targets arch-os-abi: ``aarch64-linux-gnu`` as is, ``armv7l-...`` becomes ``arm-...``."""
    parts = triple.split("-")
    arch = triple_arch(triple)
    rest = [p for p in parts[1:] if p not in {"unknown", "pc", "none"}]
    return "-".join([arch, *rest])


@dataclass(frozen=True)
class Toolchain:
    """How ``export_library`` links a module: ``kind`` is ``native``, ``gnu``, ``zig`` or ``custom``."""

    kind: str
    triple: str | None
    command: tuple[str, ...]

    def describe(self) -> str:
        return f"{self.kind} ({' '.join(self.command)})" if self.command else self.kind

    def fcompile(self) -> Callable[..., None] | None:
        """The ``fcompile`` for ``export_library``; ``None`` means TVM's default host compiler."""
        if self.kind == "native":
            return None
        command = list(self.command)

        def link(output: str, objects: Sequence[str] | str, options: Sequence[str] | None = None) -> None:
            objs = [objects] if isinstance(objects, str) else list(objects)
            argv = [*command, "-shared", "-fPIC", "-o", output, *objs, *(options or [])]
            proc = subprocess.run(argv, capture_output=True, text=True)
            if proc.returncode != 0:
                tail = (proc.stderr or proc.stdout).strip()[-800:]
                raise BuildError(f"linking {os.path.basename(output)} with {self.describe()} failed: {tail}")

        link.output_format = "so"  # type: ignore[attr-defined]
        return link

    def to_json(self) -> dict:
        return {"kind": self.kind, "triple": self.triple, "command": list(self.command)}


def find_toolchain(cross_triple: str | None, prefer: str | None = None) -> Toolchain:
    """Pick the toolchain that links for ``cross_triple`` (``None``: this machine).

    ``prefer`` forces ``"gnu"`` or ``"zig"``. Raises :class:`BuildError` when none is available, naming
    what to install.
    """
    override = os.environ.get("OHQ_TVM_CXX")
    if override:
        return Toolchain("custom", cross_triple, tuple(shlex.split(override)))
    native = cross_triple is None or triple_arch(cross_triple) == host_arch()
    if native and prefer is None:
        return Toolchain("native", cross_triple, ())
    candidates = {"gnu": _gnu, "zig": _zig}
    order = [prefer] if prefer else ["gnu", "zig"]
    triple = cross_triple or f"{host_arch()}-linux-gnu"
    for kind in order:
        if kind not in candidates:
            raise BuildError(f"unknown toolchain {kind!r}; use 'gnu' or 'zig'")
        found = candidates[kind](triple)
        if found is not None:
            return found
    raise BuildError(
        f"no C++ cross compiler for {triple}: install Debian's g++-{triple} "
        f"(apt-get install g++-{triple}) or `pip install ziglang`, or set OHQ_TVM_CXX"
    )


def _gnu(triple: str) -> Toolchain | None:
    path = shutil.which(f"{triple}-g++")
    return Toolchain("gnu", triple, (path,)) if path else None


def _zig(triple: str) -> Toolchain | None:
    if importlib.util.find_spec("ziglang") is None:
        return None
    return Toolchain("zig", triple, (sys.executable, "-m", "ziglang", "c++", "-target", _zig_triple(triple)))
