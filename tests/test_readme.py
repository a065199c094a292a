"""The README's TVM-build-script snippets run as written (on a generated model)."""

from __future__ import annotations

import re
from pathlib import Path

import onnx
import pytest

from ohq_tvm import models
from ohq_tvm.build.elf import elf_machine
from ohq_tvm.passes import applied_plan
from ohq_tvm.plan import Plan

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    if not README.is_file():
        pytest.skip("needs the source tree next to the tests")
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def tiny_cnn_of_any_input_size() -> onnx.ModelProto:
    """tiny_cnn with a dynamic batch, height and width: the snippet's ``load_onnx`` gives them values."""
    model = models.tiny_cnn()
    dims = model.graph.input[0].type.tensor_type.shape.dim
    for index, name in ((0, "batch"), (2, "height"), (3, "width")):
        dims[index].dim_param = name
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    return model


def test_build_script_snippets_run(tmp_path, monkeypatch):
    blocks = python_blocks()
    build_script = next(block for block in blocks if "load_onnx" in block)
    passes_script = next(block for block in blocks if "AnnotateCandidates" in block)
    rewrite_script = next(block for block in blocks if "ApplyPlan" in block)
    models.save(tiny_cnn_of_any_input_size(), tmp_path / "model.onnx")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(build_script, str(README), "exec"), namespace)
    assert elf_machine(tmp_path / "model.so") == "aarch64"
    exec(compile(passes_script, str(README), "exec"), namespace)  # continues with the same board/model
    plan = Plan.load(tmp_path / "plan.json")
    assert plan.target == "rpi5"
    assert plan.counts() == {"fp32": 2, "int8": 5}
    exec(compile(rewrite_script, str(README), "exec"), namespace)  # and rewrites, builds, exports QDQ
    assert applied_plan(namespace["quantized"]) == plan.assignments
    assert 'out_dtype="int32"' in namespace["quantized"].script()
    qdq = onnx.load(str(tmp_path / "model.qdq.onnx"))
    assert sum(node.op_type == "QuantizeLinear" for node in qdq.graph.node) == 5  # one per int8 layer input


def test_measurement_snippet_runs(tmp_path, monkeypatch):
    script = next(block for block in python_blocks() if "measure_model" in block)
    models.save(models.conv_model(channels=8, size=8), tmp_path / "model.onnx")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(script, str(README), "exec"), namespace)
    predicted = namespace["predicted"]
    assert set(predicted.by_kind()) == {"layer", "quantize", "dequantize"}
    assert predicted.total_ms > 0 and (tmp_path / "oqa.sqlite").is_file()
