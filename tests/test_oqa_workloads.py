"""OQA workloads: what is extracted from a model, how a plan combines them, and that they build and run."""

from __future__ import annotations

import numpy as np
import pytest

from ohq_tvm import Precision, models
from ohq_tvm.errors import OHQError
from ohq_tvm.frontend import load_onnx
from ohq_tvm.oqa import Workload, extract_workloads
from ohq_tvm.oqa.cost import conversion_ms, part_ms, plan_latency, plan_parts
from ohq_tvm.passes import AnnotateCandidates

from testing_support import run_local

INT8, FP32, FP16, INT4W = Precision.INT8, Precision.FP32, Precision.FP16, Precision.INT4W


def _workloads(model, precisions=(FP32, INT8)):
    imported = load_onnx(model)
    return extract_workloads(AnnotateCandidates(list(precisions), pin_first_last=False)(imported.mod))


@pytest.fixture(scope="module")
def tiny():
    return _workloads(models.tiny_cnn(), (FP32, FP16, INT8, INT4W))


def test_every_layer_has_one_workload_per_candidate(tiny):
    assert list(tiny.layers) == ["stem_conv", "dw1", "pw1", "expand2", "dw2", "project2", "classifier"]
    assert all(set(options) == {FP32, FP16, INT8, INT4W} for options in tiny.layers.values())
    stem = tiny.layers["stem_conv"][INT8]
    assert (stem.op, stem.input_shape, stem.weight_shape, stem.output_shape) == (
        "conv2d",
        (1, 3, 32, 32),
        (16, 3, 3, 3),
        (1, 16, 16, 16),
    )
    assert stem.bias and stem.activation == "relu"
    # The stem reads the model input (zero point unknown); dw1 reads a ReLU output (zero point 0).
    assert stem.input_zero_point and not tiny.layers["dw1"][INT8].input_zero_point
    # pw1 has no activation; its output feeds expand2 and the residual add.
    assert tiny.layers["pw1"][FP32].activation is None
    assert tiny.readers["pw1"] == ["expand2", None]
    assert tiny.producers["expand2"] == "pw1" and tiny.producers["stem_conv"] is None
    assert [w.op for w in tiny.glue] == ["add", "mean", "reshape"]
    kinds = [w.kind for w in tiny.unique()]
    assert kinds.count("layer") == 28 and kinds.count("glue") == 3


def test_keys_depend_on_shapes_and_precision_not_on_weights():
    a = _workloads(models.tiny_cnn(seed=0))
    b = _workloads(models.tiny_cnn(seed=7))
    assert [w.key for w in a.unique()] == [w.key for w in b.unique()]
    assert a.layers["pw1"][FP32].key != a.layers["pw1"][INT8].key
    bigger = _workloads(models.tiny_cnn(size=64))
    assert a.layers["pw1"][FP32].key != bigger.layers["pw1"][FP32].key
    # A workload survives the trip through the database's JSON.
    for workload in a.unique():
        if workload.kind != "glue":
            assert Workload.from_json(workload.to_json()).key == workload.key


def test_relu6_clip_is_part_of_the_layer():
    mobilenet = _workloads(models.mobilenet_v2(size=32, width=0.35))
    first = next(iter(mobilenet.layers.values()))[INT8]
    assert first.activation == "clip:0:6"
    assert {w.op for w in mobilenet.glue} <= {"add", "mean", "reshape"}


def test_integer_layer_workload_reads_and_writes_uint8(tiny):
    mod = tiny.layers["dw1"][INT8].module()
    (param,) = mod["main"].params
    assert str(param.ty.dtype) == "uint8"
    assert str(mod["main"].ret_ty.dtype) == "uint8"
    text = mod.script()
    assert 'out_dtype="int32"' in text and "R.quantize" not in text and "R.dequantize" not in text
    half = tiny.layers["dw1"][FP16].module().script()
    assert 'out_dtype="float16"' in half
    assert str(tiny.quantize["dw1"].module()["main"].ret_ty.dtype) == "uint8"


def test_every_workload_builds_and_runs(tiny):
    for workload in tiny.unique():
        (out,) = run_local(workload.module(), *workload.synthetic_inputs())
        assert out.shape == workload.output_shape, workload.label
        if out.dtype == np.float32:
            assert np.isfinite(out).all(), workload.label


def test_plan_parts_charge_conversions_only_at_precision_boundaries(tiny):
    uniform_fp32 = {lid: FP32 for lid in tiny.layers}
    assert [w.kind for _, w in plan_parts(tiny, uniform_fp32)].count("layer") == 7
    assert {w.kind for _, w in plan_parts(tiny, uniform_fp32)} == {"layer", "glue"}

    uniform_int8 = {lid: INT8 for lid in tiny.layers}
    names = [what for what, w in plan_parts(tiny, uniform_int8) if w.kind in ("quantize", "dequantize")]
    # In: the model input and the pooled features (glue). Out: pw1 and project2 feed the residual add,
    # the classifier is the result.
    assert sorted(names) == sorted(
        [
            "stem_conv:quantize",
            "classifier:quantize",
            "pw1:dequantize",
            "project2:dequantize",
            "classifier:dequantize",
        ]
    )

    mixed = dict(uniform_int8, dw1=FP32)
    names = [what for what, w in plan_parts(tiny, mixed) if w.kind in ("quantize", "dequantize")]
    assert "stem_conv:dequantize" in names and "pw1:quantize" in names


def test_conversions_are_timed_as_the_build_fuses_them(tiny):
    # A dequantize is its integer layer writing float32 from the accumulator (ApplyPlan's form).
    dequantize = tiny.dequantize["dw1"]
    assert dequantize.fused_layer == tiny.layers["dw1"][INT8]
    assert dequantize.label.startswith("dequantize fused into depthwise_conv2d")
    main = dequantize.module()["main"]
    assert str(main.params[0].ty.dtype) == "uint8" and str(main.ret_ty.dtype) == "float32"
    assert "R.dequantize" in dequantize.module().script()
    assert dequantize.macs == tiny.layers["dw1"][INT8].macs
    # dw1 reads stem_conv, whose only reader it is: the quantize is stem_conv's fp32 layer quantizing its
    # output in the same kernel (float32 in, uint8 out).
    quantize = tiny.quantize["dw1"]
    assert quantize.fused_layer == tiny.layers["stem_conv"][FP32]
    main = quantize.module()["main"]
    assert str(main.params[0].ty.dtype) == "float32" and str(main.ret_ty.dtype) == "uint8"
    # The model input, glue (the pooled features) and a layer another op also reads (pw1 feeds the
    # residual add) leave the quantize a standalone operator, as in the built model.
    for layer_id in ("stem_conv", "classifier", "expand2"):
        assert tiny.quantize[layer_id].fused_layer is None and tiny.quantize[layer_id].op == "quantize"


def test_a_fused_conversion_costs_what_it_adds_to_its_layer(tiny):
    plan = {lid: INT8 for lid in tiny.layers}
    parts = plan_parts(tiny, plan)
    latencies = {w.key: float(i + 1) for i, (_, w) in enumerate(parts)}
    for _, w in parts:  # the fused conversions' layers, timed alone
        if w.fused_layer is not None:
            latencies.setdefault(w.fused_layer.key, 0.25)
    pw1 = tiny.dequantize["pw1"]
    latencies[pw1.key] = latencies[pw1.fused_layer.key] - 0.5  # float32 out faster than the requantize
    assert conversion_ms(pw1, latencies) == pytest.approx(-0.5)
    result = plan_latency(tiny, plan, latencies)
    expected = sum(
        latencies[w.key] - (latencies[w.fused_layer.key] if w.fused_layer is not None else 0.0)
        for _, w in parts
    )
    assert result.total_ms == pytest.approx(expected)
    assert dict((what, ms) for what, _, ms in result.parts)["pw1:dequantize"] == pytest.approx(-0.5)


def test_plan_latency_sums_the_parts_and_names_what_is_missing(tiny):
    plan = {lid: INT8 for lid in tiny.layers}
    parts = plan_parts(tiny, plan)
    latencies = {w.key: float(i + 1) for i, (_, w) in enumerate(parts)}
    result = plan_latency(tiny, plan, latencies)
    assert result.total_ms == pytest.approx(sum(part_ms(w, latencies) for _, w in parts))
    assert set(result.by_kind()) == {"layer", "quantize", "dequantize", "glue"}
    del latencies[tiny.layers["dw2"][INT8].key]
    with pytest.raises(OHQError, match="dw2"):
        plan_latency(tiny, plan, latencies)
    with pytest.raises(OHQError, match="no precision"):
        plan_parts(tiny, {"dw1": INT8})


def test_an_explicit_onnx_pad_is_a_glue_workload_that_builds(rng):
    # A Pad the import cannot fold into the conv (here: reflect mode) is lowered by the importer to a TIR
    # function of its own (R.call_tir), which the glue workload must carry along.
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "w")
    pads = numpy_helper.from_array(np.array([0, 0, 0, 0, 0, 0, 1, 1], np.int64), "pads")
    graph = helper.make_graph(
        [
            helper.make_node("Pad", ["x", "pads"], ["padded"], mode="reflect", name="reflect_pad"),
            helper.make_node("Conv", ["padded", "w"], ["y"], strides=[2, 2], name="conv"),
        ],
        "pad_conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 4, 4])],
        [weight, pads],
    )
    workloads = _workloads(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    (pad,) = [w for w in workloads.glue if w.op == "mirror_pad"]
    assert pad.label == f"{pad.op} 1x3x8x8" and pad.output_shape == (1, 3, 9, 9)
    x = rng.normal(size=(1, 3, 8, 8)).astype(np.float32)
    (got,) = run_local(pad.module(), x)
    np.testing.assert_array_equal(got, np.pad(x, [(0, 0), (0, 0), (0, 1), (0, 1)], mode="reflect"))
