"""Read the machine field of an ELF header, to check a library was linked for the board's architecture."""

from __future__ import annotations

import os
import struct

from ..errors import BuildError

# e_machine values from the ELF specification, named as our triples name architectures.
ELF_MACHINES = {3: "i386", 40: "arm", 62: "x86_64", 183: "aarch64", 243: "riscv"}


def elf_machine(path: str | os.PathLike) -> str:
    """Architecture of the ELF file at ``path`` (``"aarch64"``, ``"x86_64"``, ...).

    Raises :class:`BuildError` if the file is not ELF.
    """
    with open(path, "rb") as stream:
        header = stream.read(20)
    if len(header) < 20 or header[:4] != b"\x7fELF":
        raise BuildError(f"{path} is not an ELF file")
    byte_order = {1: "<", 2: ">"}.get(header[5])
    if byte_order is None:
        raise BuildError(f"{path}: unknown ELF data encoding {header[5]}")
    (machine,) = struct.unpack_from(byte_order + "H", header, 18)
    return ELF_MACHINES.get(machine, f"e_machine={machine}")
