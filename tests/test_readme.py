"""The README's TVM-build-script snippets run as written (on a generated model)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import pytest
import tvm
from tvm import relax

from ohq_tvm import models
from ohq_tvm.board.threads import host_vm
from ohq_tvm.calibration import calibrate
from ohq_tvm.codegen.elf import elf_machine
from ohq_tvm.frontend import load_onnx, synthetic_inputs
from ohq_tvm.passes import ApplyPlan, applied_plan
from ohq_tvm.plan import Plan

README = Path(__file__).resolve().parents[1] / "README.md"
TINY_CNN_LAYERS = ["stem_conv", "dw1", "pw1", "expand2", "dw2", "project2", "classifier"]


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


def test_from_onnx_snippet_quantizes_like_load_onnx(tmp_path, monkeypatch):
    """TVM's own importer, then AssignLayerIds, calibrate on the module and ApplyPlan: the layers carry
    the ONNX names, the ranges are load_onnx's (BatchNormalization unfolded computes the same values) and
    the built module computes what the load_onnx path's plan does."""
    script = next(block for block in python_blocks() if "from_onnx" in block)
    models.save(tiny_cnn_of_any_input_size(), tmp_path / "model.onnx")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(script, str(README), "exec"), namespace)
    imported = load_onnx(tmp_path / "model.onnx", {"input": (1, 3, 224, 224)})
    expected = calibrate(imported, "minmax")
    calibration = namespace["calibration"]
    assert calibration.source == "synthetic:gaussian" and calibration.num_samples == 8
    assert sorted(calibration.ranges) == sorted(expected.ranges) == sorted(TINY_CNN_LAYERS)
    for layer_id, (low, high) in expected.ranges.items():
        assert calibration.ranges[layer_id] == pytest.approx((low, high), rel=1e-4, abs=1e-5)
    assert applied_plan(namespace["lowered"]) == namespace["plan"].assignments
    reference = ApplyPlan(namespace["plan"], expected)(imported.mod)
    x = synthetic_inputs(imported.inputs)["input"]
    ours = host_vm(namespace["executable"])["main"](tvm.runtime.tensor(x)).numpy()
    theirs = host_vm(relax.build(reference, "llvm"))["main"](tvm.runtime.tensor(x)).numpy()
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=0.05 * np.abs(theirs).max())


def test_measurement_snippet_runs(tmp_path, monkeypatch):
    script = next(block for block in python_blocks() if "measure_model" in block)
    models.save(models.conv_model(channels=8, size=8), tmp_path / "model.onnx")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(script, str(README), "exec"), namespace)
    predicted = namespace["predicted"]
    assert set(predicted.by_kind()) == {"layer", "quantize", "dequantize"}
    assert predicted.total_ms > 0 and (tmp_path / "oqa.sqlite").is_file()
