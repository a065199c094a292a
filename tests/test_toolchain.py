"""Toolchain choice and ELF checks for cross-linked libraries."""

from __future__ import annotations

import shutil
import struct

import pytest

from ohq_tvm.codegen import find_toolchain, host_arch, triple_arch
from ohq_tvm.codegen.elf import elf_machine
from ohq_tvm.codegen.toolchain import _zig_triple
from ohq_tvm.errors import BuildError


def test_native_build_uses_tvm_default(monkeypatch):
    monkeypatch.delenv("OHQ_TVM_CXX", raising=False)
    chain = find_toolchain(None)
    assert chain.kind == "native" and chain.fcompile() is None
    assert find_toolchain(f"{host_arch()}-linux-gnu").kind == "native"


def test_cross_prefers_debian_gcc_then_zig(monkeypatch):
    monkeypatch.delenv("OHQ_TVM_CXX", raising=False)
    chain = find_toolchain("aarch64-linux-gnu")
    expected = "gnu" if shutil.which("aarch64-linux-gnu-g++") else "zig"
    assert chain.kind == expected
    zig = find_toolchain("aarch64-linux-gnu", prefer="zig")
    assert zig.kind == "zig"
    assert zig.command[1:] == ("-m", "ziglang", "c++", "-target", "aarch64-linux-gnu")


def test_missing_gnu_cross_compiler_names_the_package(monkeypatch):
    monkeypatch.delenv("OHQ_TVM_CXX", raising=False)
    monkeypatch.setattr(shutil, "which", lambda _name: None)
    with pytest.raises(BuildError, match=r"g\+\+-riscv64-linux-gnu"):
        find_toolchain("riscv64-linux-gnu", prefer="gnu")


def test_environment_override(monkeypatch):
    monkeypatch.setenv("OHQ_TVM_CXX", "clang++ --target=aarch64-linux-gnu")
    chain = find_toolchain("aarch64-linux-gnu")
    assert chain.kind == "custom" and chain.command == ("clang++", "--target=aarch64-linux-gnu")


@pytest.mark.parametrize(
    ("triple", "arch", "zig"),
    [
        ("aarch64-linux-gnu", "aarch64", "aarch64-linux-gnu"),
        ("armv7l-linux-gnueabihf", "arm", "arm-linux-gnueabihf"),
        ("x86_64-unknown-linux-gnu", "x86_64", "x86_64-linux-gnu"),
    ],
)
def test_triple_spelling(triple, arch, zig):
    assert triple_arch(triple) == arch
    assert _zig_triple(triple) == zig


def _fake_elf(path, machine: int, little: bool = True) -> None:
    order = "<" if little else ">"
    header = b"\x7fELF" + bytes([2, 1 if little else 2, 1]) + bytes(9)
    header += struct.pack(order + "HH", 3, machine)
    path.write_bytes(header + bytes(44))


def test_elf_machine_reads_both_byte_orders(tmp_path):
    _fake_elf(tmp_path / "a.so", 183)
    _fake_elf(tmp_path / "b.so", 62, little=False)
    assert elf_machine(tmp_path / "a.so") == "aarch64"
    assert elf_machine(tmp_path / "b.so") == "x86_64"
    (tmp_path / "c.so").write_bytes(b"MZ not an elf file at all....")
    with pytest.raises(BuildError, match="not an ELF file"):
        elf_machine(tmp_path / "c.so")
