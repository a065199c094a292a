"""CanonicalizeClip: ONNX Clip imports as one relax.clip a layer can own, with identical results."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from ohq_tvm import Precision, models
from ohq_tvm.calibration import calibrate
from ohq_tvm.frontend import load_onnx
from ohq_tvm.layers import quantizable_layers
from ohq_tvm.oqa import extract_workloads
from ohq_tvm.oqa.cost import plan_parts
from ohq_tvm.passes import ApplyPlan
from ohq_tvm.plan import Plan

from testing_support import run_local


def _ops(mod) -> list[str]:
    func = mod["main"]
    return [
        b.value.op.name if hasattr(b.value.op, "name") else "call"
        for block in func.body.blocks
        for b in block.bindings
        if hasattr(b.value, "op")
    ]


def _clip_model(low: float | None, high: float | None) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 5, 5])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 5, 5])
    inits, names = [], ["x"]
    for name, value in (("lo", low), ("hi", high)):
        if value is None:
            names.append("")
        else:
            inits.append(numpy_helper.from_array(np.array(value, np.float32), name))
            names.append(name)
    node = helper.make_node("Clip", names, ["y"], name="clip")
    graph = helper.make_graph([node], "clip", [x], [y], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_clip_becomes_one_relax_clip_with_identical_results(rng):
    for low, high in ((0.0, 6.0), (-1.0, None), (None, 0.5)):
        model = _clip_model(low, high)
        imported = load_onnx(model)
        assert _ops(imported.mod) == ["relax.clip"]
        assert [gv.name_hint for gv in imported.mod.get_global_vars()] == ["main"]
        x = rng.standard_normal((1, 4, 5, 5)).astype(np.float32) * 4
        (got,) = run_local(imported.mod, x)
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        np.testing.assert_array_equal(got, session.run(None, {"x": x})[0])


def test_integer_layers_absorb_relu6_and_conversions_match_the_cost_model():
    imported = load_onnx(models.mobilenet_v2(size=32, width=0.35))
    assert "relax.call_tir" not in _ops(imported.mod)
    layers = quantizable_layers(imported.mod)
    plan = Plan.uniform(layers, Precision.INT8)
    rewritten = ApplyPlan(plan, calibrate(imported, "minmax", num_samples=2))(imported.mod)
    ops = _ops(rewritten)
    workloads = extract_workloads(imported.mod, [Precision.FP32, Precision.INT8])
    parts = [(what, w.kind) for what, w in plan_parts(workloads, plan.assignments)]
    # Every ReLU6 became requantize bounds; a float clip is left only after a dequantize to float readers.
    dequantized = [what.split(":")[0] for what, kind in parts if kind == "dequantize"]
    float_clips = sum(workloads.layers[lid][Precision.INT8].activation is not None for lid in dequantized)
    assert ops.count("relax.clip") == ops.count("relax.round") + float_clips
    # The rewrite inserts exactly the conversions the latency model charges for.
    parts = [kind for _, kind in parts]
    assert parts.count("quantize") == ops.count("relax.quantize")
    assert parts.count("dequantize") == ops.count("relax.dequantize")
