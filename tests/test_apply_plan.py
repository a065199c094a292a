"""ApplyPlan: integer layers match an integer reference exactly, boundaries are minimal, bad plans fail."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import tvm
from onnx import numpy_helper
from tvm import relax

from ohq_tvm import Precision, models
from ohq_tvm.calibration import Calibration, calibrate, synthetic_batches
from ohq_tvm.frontend import load_onnx
from ohq_tvm.layers import quantizable_layers
from ohq_tvm.passes import AnnotateCandidates, ApplyPlan, applied_plan
from ohq_tvm.passes.apply_plan import layer_weight
from ohq_tvm.passes.layer_id import bound_values, layer_bindings
from ohq_tvm.plan import Plan, PlanError
from ohq_tvm.qdq import export_qdq
from ohq_tvm.qparams import pack_int4, quantize_weight, unpack_int4

from testing_support import conv2d_int_reference, host_target, run_local

INT8, INT4W = Precision.INT8, Precision.INT4W


def _single_layer(onnx_model):
    """Imported model, its only layer's call, weight, bias and calibration (minmax, synthetic)."""
    imported = load_onnx(onnx_model)
    func = imported.mod["main"]
    (binding,) = layer_bindings(func)
    values = bound_values(func)
    weight = layer_weight(binding.value, values)
    calibration = calibrate(imported, "minmax", num_samples=2)
    return imported, binding, weight, calibration


def _bias(onnx_model, name: str) -> np.ndarray:
    (init,) = [init for init in onnx_model.graph.initializer if init.name == name]
    return numpy_helper.to_array(init)


@pytest.mark.parametrize(
    ("onnx_model", "bias_name", "groups", "precision"),
    [
        (models.conv_model(channels=8, size=10), "conv0.bias", 1, INT8),
        (models.depthwise_conv_model(channels=8, size=10), "dwconv0.bias", 8, INT8),
        (models.conv_model(channels=8, size=10), "conv0.bias", 1, INT4W),
        (models.depthwise_conv_model(channels=8, size=10), "dwconv0.bias", 8, INT4W),
    ],
    ids=["conv-int8", "depthwise-int8", "conv-int4w", "depthwise-int4w"],
)
def test_conv_layer_matches_the_integer_reference_exactly(onnx_model, bias_name, groups, precision):
    imported, _binding, weight, calibration = _single_layer(onnx_model)
    (layer_id,) = calibration.ranges
    qp = calibration.qparams(layer_id)
    assert qp.zero_point > 0  # a signed input: the padding must carry the zero point
    rewritten = ApplyPlan(Plan.uniform([layer_id], precision), calibration)(imported.mod)
    x = np.random.default_rng(7).standard_normal(imported.inputs[0].shape).astype(np.float32) * 1.3
    (out,) = run_local(rewritten, x)

    qw = quantize_weight(weight, precision, axis=0)
    qx = qp.quantize(x)
    acc = conv2d_int_reference(qx, qw.values, padding=(1, 1, 1, 1), groups=groups, pad_value=qp.zero_point)
    acc -= qp.zero_point * conv2d_int_reference(
        np.ones_like(qx), qw.values, padding=(1, 1, 1, 1), groups=groups, pad_value=1
    )
    scale_out = (np.float32(qp.scale) * qw.scales).astype(np.float32)
    acc += np.rint(_bias(onnx_model, bias_name) / scale_out).astype(np.int64).reshape(1, -1, 1, 1)
    expected = np.maximum(acc.astype(np.int32).astype(np.float32) * scale_out.reshape(1, -1, 1, 1), 0)
    np.testing.assert_array_equal(out, expected)
    # ... and the rewrite is a quantization of the float layer, not something else.
    (reference,) = run_local(imported.mod, x)
    assert np.abs(out - reference).max() < (0.05 if precision is INT8 else 0.6) * np.abs(reference).max()


@pytest.mark.parametrize("precision", [INT8, INT4W])
def test_dense_layer_matches_the_integer_reference_exactly(precision):
    onnx_model = models.gemm_model(features=48, classes=20)
    imported, _binding, weight, calibration = _single_layer(onnx_model)
    (layer_id,) = calibration.ranges
    qp = calibration.qparams(layer_id)
    rewritten = ApplyPlan(Plan.uniform([layer_id], precision), calibration)(imported.mod)
    x = np.random.default_rng(3).standard_normal((1, 48)).astype(np.float32)
    (out,) = run_local(rewritten, x)

    assert weight.shape == (48, 20)  # Gemm transB=1: the layer sees W^T
    qw = quantize_weight(weight, precision, axis=1)
    qx = qp.quantize(x).astype(np.int64)
    acc = qx @ qw.values.astype(np.int64) - qp.zero_point * qw.values.astype(np.int64).sum(axis=0)
    scale_out = (np.float32(qp.scale) * qw.scales).astype(np.float32)
    acc += np.rint(_bias(onnx_model, "fc0.bias") / scale_out).astype(np.int64)
    np.testing.assert_array_equal(out, acc.astype(np.int32).astype(np.float32) * scale_out)


@pytest.fixture(scope="module")
def tiny():
    imported = load_onnx(models.tiny_cnn())
    return imported, calibrate(imported, "minmax", num_samples=4)


def _producers(mod: tvm.IRModule) -> dict[str, str]:
    """layer id → op that produced the layer's data input, looking through a zero-point pad."""
    func = mod["main"]
    values = bound_values(func)
    found = {}
    for binding in layer_bindings(func):
        data = binding.value.args[0]
        producer = values.get(data)
        if isinstance(producer, relax.Call) and producer.op.name == "relax.nn.pad":  # zero-point padding
            producer = values.get(producer.args[0])
        found[binding.var.name[4:]] = producer.op.name if isinstance(producer, relax.Call) else "param"
    return found


def _ops(mod: tvm.IRModule) -> list[str]:
    return [
        b.value.op.name
        for block in mod["main"].body.blocks
        for b in block.bindings
        if isinstance(b.value, relax.Call) and isinstance(b.value.op, tvm.ir.Op)
    ]


def test_adjacent_int8_layers_requantize_without_dequantize_quantize(tiny):
    imported, calibration = tiny
    rewritten = ApplyPlan(Plan.uniform(quantizable_layers(imported.mod), INT8), calibration)(imported.mod)
    producers = _producers(rewritten)
    # stem → dw1 → pw1 → expand2 → dw2 → project2 are int8 back to back: each reads the previous layer's
    # uint8 requantize (an astype), never a quantize of a dequantized tensor.
    for layer in ["dw1", "pw1", "expand2", "dw2", "project2"]:
        assert producers[layer] == "relax.astype", (layer, producers[layer])
    # Boundaries only: the float input, the float mean-pool before the classifier.
    assert producers["stem_conv"] == producers["classifier"] == "relax.quantize"
    ops = _ops(rewritten)
    assert ops.count("relax.quantize") == 2
    # pw1 feeds the residual add, project2 and the classifier feed float ops: three dequantizes, no more.
    assert ops.count("relax.dequantize") == 3
    assert applied_plan(rewritten) == dict.fromkeys(calibration.ranges, INT8)


@pytest.mark.parametrize(("precision", "bound"), [(INT8, 0.05), (INT4W, 0.35), (Precision.FP16, 2e-3)])
def test_whole_model_stays_within_documented_bounds_of_fp32(tiny, precision, bound):
    imported, calibration = tiny
    plan = Plan.uniform(quantizable_layers(imported.mod), precision)
    x = synthetic_batches(imported.inputs, 1, seed=11)[0]["input"]
    (reference,) = run_local(imported.mod, x)
    (out,) = run_local(ApplyPlan(plan, calibration)(imported.mod), x)
    relative = np.linalg.norm(out - reference) / np.linalg.norm(reference)
    assert relative < bound


def test_mixed_plan_keeps_fp32_layers_float(tiny):
    imported, calibration = tiny
    plan = Plan.uniform(quantizable_layers(imported.mod), INT8)
    plan.assign("stem_conv", "fp32")
    plan.assign("dw2", "int4w")
    plan.assign("classifier", "fp32")
    rewritten = ApplyPlan(plan, calibration)(imported.mod)
    dtypes = {b.var.name[4:]: b.var.ty.dtype for b in layer_bindings(rewritten["main"])}
    assert dtypes["stem_conv"] == dtypes["classifier"] == "float32"
    assert dtypes["dw1"] == dtypes["pw1"] == "int32"
    assert "dw2" not in dtypes  # int4w runs in its own TIR kernel (call_tir), reading packed weights
    producers = _producers(rewritten)
    assert producers["dw1"] == "relax.quantize"  # fp32 stem → int8 dw1 is a boundary
    assert producers["classifier"] == "relax.reshape"  # stays on the float path
    x = synthetic_batches(imported.inputs, 1, seed=2)[0]["input"]
    (reference,) = run_local(imported.mod, x)
    (out,) = run_local(rewritten, x)
    assert np.linalg.norm(out - reference) / np.linalg.norm(reference) < 0.2


def test_passes_compose_in_a_sequential_with_stock_relax_passes(tiny):
    imported, calibration = tiny
    plan = Plan.uniform(quantizable_layers(imported.mod), INT8)
    plan.assign("stem_conv", "fp32")
    plan.assign("classifier", "fp32")
    pipeline = tvm.transform.Sequential(
        [
            AnnotateCandidates(["int8", "int4w"]),
            ApplyPlan(plan, calibration),
            relax.transform.FoldConstant(),
            relax.transform.LegalizeOps(),
            relax.transform.FoldConstant(),
        ]
    )
    lowered = pipeline(imported.mod)
    executable = relax.build(lowered, host_target())
    vm = relax.VirtualMachine(executable, tvm.cpu())
    x = synthetic_batches(imported.inputs, 1, seed=4)[0]["input"]
    out = vm["main"](tvm.runtime.tensor(x)).numpy()
    (reference,) = run_local(imported.mod, x)
    assert np.linalg.norm(out - reference) / np.linalg.norm(reference) < 0.05


def test_int4w_weights_stay_packed_through_constant_folding():
    imported, _, weight, calibration = _single_layer(models.conv_model(channels=8, size=10))
    rewritten = ApplyPlan(Plan.uniform(list(calibration.ranges), INT4W), calibration)(imported.mod)
    lowered = tvm.transform.Sequential([relax.transform.LegalizeOps(), relax.transform.FoldConstant()])(
        rewritten
    )
    packed = []
    for block in lowered["main"].body.blocks:
        for b in block.bindings:
            if isinstance(b.value, relax.Call) and "int4w" in str(b.value.args[0]):
                packed += [a for a in b.value.args[1] if isinstance(a, tvm.ir.expr.Constant)]
    (constant,) = packed
    assert constant.value.dtype == "uint8"
    assert constant.value.shape == ((weight.size + 1) // 2,)
    qw = quantize_weight(weight, INT4W, axis=0)
    np.testing.assert_array_equal(constant.value.numpy(), pack_int4(qw.values))
    np.testing.assert_array_equal(unpack_int4(constant.value.numpy(), weight.size), qw.values.reshape(-1))


def test_integer_plan_without_calibration_says_so(tiny):
    imported, _ = tiny
    plan = Plan.uniform(quantizable_layers(imported.mod), INT8)
    with pytest.raises(PlanError, match="no calibration"):
        ApplyPlan(plan)(imported.mod)
    partial = Calibration("minmax", "test", 1, {"stem_conv": (0.0, 1.0)})
    with pytest.raises(PlanError, match="no range for layer"):
        ApplyPlan(plan, partial)(imported.mod)


def test_fp32_plan_needs_no_calibration_and_changes_nothing_numerically(tiny):
    imported, _ = tiny
    rewritten = ApplyPlan(Plan.uniform(quantizable_layers(imported.mod), "fp32"))(imported.mod)
    x = synthetic_batches(imported.inputs, 1, seed=1)[0]["input"]
    np.testing.assert_array_equal(run_local(rewritten, x)[0], run_local(imported.mod, x)[0])


def test_bad_plans_are_rejected(tiny):
    imported, calibration = tiny
    layers = quantizable_layers(imported.mod)
    annotated = AnnotateCandidates(["int8"])(imported.mod)  # first/last pinned to fp32
    with pytest.raises(PlanError, match=r"stem_conv.*not allowed"):
        ApplyPlan(Plan.uniform(layers, INT8), calibration)(annotated)
    unknown = Plan.uniform(layers, INT8)
    unknown.assign("stem_cnov", "int8")
    with pytest.raises(PlanError, match="did you mean stem_conv"):
        ApplyPlan(unknown, calibration)(imported.mod)
    once = ApplyPlan(Plan.uniform(layers, "fp32"))(imported.mod)
    with pytest.raises(PlanError, match="already has a plan"):
        ApplyPlan(Plan.uniform(layers, "fp32"))(once)


def test_a_near_dead_channel_with_a_bias_does_not_overflow_the_accumulator():
    """Batch norm folded over a dead channel leaves weights ~1e-8 and a real bias: bias / (s_x * s_w)
    would exceed int32, so that channel's weight scale is raised and its output stays the bias."""
    model = models.conv_model(channels=8, size=10)
    weights = {init.name: init for init in model.graph.initializer}
    weight = numpy_helper.to_array(weights["conv0.weight"]).copy()
    bias = numpy_helper.to_array(weights["conv0.bias"]).copy()
    weight[1] = 1e-8
    bias[1] = 0.5
    weights["conv0.weight"].CopyFrom(numpy_helper.from_array(weight, "conv0.weight"))
    weights["conv0.bias"].CopyFrom(numpy_helper.from_array(bias, "conv0.bias"))
    imported, _binding, _weight, calibration = _single_layer(model)
    (layer_id,) = calibration.ranges
    plan = Plan.uniform([layer_id], INT8)
    x = np.random.default_rng(3).standard_normal(imported.inputs[0].shape).astype(np.float32)
    (out,) = run_local(ApplyPlan(plan, calibration)(imported.mod), x)
    (fp32,) = run_local(imported.mod, x)
    np.testing.assert_allclose(out[0, 1], 0.5, atol=0.02)
    np.testing.assert_allclose(out, fp32, atol=0.1 * float(np.abs(fp32).max()))
    qdq = export_qdq(imported, plan, calibration)
    session = ort.InferenceSession(qdq.SerializeToString(), providers=["CPUExecutionProvider"])
    (from_ort,) = session.run(None, {imported.inputs[0].name: x})
    np.testing.assert_allclose(from_ort[0, 1], 0.5, atol=0.02)
