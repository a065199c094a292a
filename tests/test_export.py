"""Export for the host and cross-linked for aarch64 (with each available toolchain), and the manifest."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct

import pytest
import tvm

from ohq_tvm import models
from ohq_tvm.codegen import build_executable, export_module, find_toolchain
from ohq_tvm.frontend import load_onnx
from ohq_tvm.targets import resolve_target

EM_AARCH64 = 183
EM_X86_64 = 62


def read_e_machine(path) -> int:
    """ELF e_machine, parsed here independently of the package's own reader."""
    with open(path, "rb") as stream:
        data = stream.read(20)
    assert data[:4] == b"\x7fELF", "not an ELF file"
    assert data[4] == 2, "expected a 64-bit ELF"
    return struct.unpack_from("<H" if data[5] == 1 else ">H", data, 18)[0]


@pytest.fixture(scope="module")
def imported():
    return load_onnx(models.MODELS["conv"]())


TOOLCHAINS = [
    pytest.param(
        "gnu",
        marks=pytest.mark.skipif(
            shutil.which("aarch64-linux-gnu-g++") is None,
            reason="Debian's g++-aarch64-linux-gnu is not installed",
        ),
    ),
    pytest.param("zig", marks=pytest.mark.slow),  # 70 s in a fresh clone on a 2-core host
]


@pytest.mark.parametrize("toolchain", TOOLCHAINS)
def test_aarch64_export_is_an_aarch64_elf(tmp_path, imported, toolchain):
    board = resolve_target("rpi4b")
    executable = build_executable(imported.mod, board)
    chain = find_toolchain(board.cross_triple, prefer=toolchain)
    exported = export_module(executable, tmp_path, board, imported, toolchain=chain)
    assert read_e_machine(exported.library_path) == EM_AARCH64
    manifest = json.loads(exported.manifest_path.read_text())
    assert manifest["library"]["elf_machine"] == "aarch64"
    assert manifest["library"]["toolchain"]["kind"] == toolchain
    assert manifest["tvm_target"]["mtriple"] == "aarch64-linux-gnu"
    assert manifest["tvm_target"]["mcpu"] == "cortex-a72"


def test_host_export_manifest_records_what_was_built(tmp_path, imported):
    board = resolve_target("host")
    exported = export_module(build_executable(imported.mod, board), tmp_path, board, imported)
    assert read_e_machine(exported.library_path) == EM_X86_64
    manifest = json.loads(exported.manifest_path.read_text())
    digest = hashlib.sha256(exported.library_path.read_bytes()).hexdigest()
    assert manifest["library"]["sha256"] == digest
    assert manifest["model"]["sha256"] == imported.sha256
    assert manifest["versions"]["tvm"] == tvm.__version__
    assert manifest["inputs"] == [spec.to_json() for spec in imported.inputs]
    assert manifest["outputs"][0]["shape"] == list(imported.outputs[0].shape)
    assert manifest["board"]["name"] == "host"
