"""The README's TVM-build-script snippet runs as written (on a generated model)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ohq_tvm import models
from ohq_tvm.build.elf import elf_machine

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    if not README.is_file():
        pytest.skip("needs the source tree next to the tests")
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_build_script_snippet_runs(tmp_path, monkeypatch):
    snippet = next(block for block in python_blocks() if "load_onnx" in block)
    models.save(models.tiny_cnn(), tmp_path / "model.onnx")
    monkeypatch.chdir(tmp_path)
    exec(compile(snippet, str(README), "exec"), {})
    assert elf_machine(tmp_path / "model.so") == "aarch64"
