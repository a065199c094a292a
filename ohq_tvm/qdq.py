"""Export a plan as an ONNX QDQ model, so ONNX Runtime users run the same mixed-precision model.

Integer layers get the arithmetic of :mod:`ohq_tvm.qparams` in ONNX's standard QDQ form:
``QuantizeLinear → DequantizeLinear`` (uint8, per tensor) on the activation, int8 per-channel weights behind
a ``DequantizeLinear``, and the bias as int32 at scale ``s_x · s_w``. ONNX Runtime fuses these into its own
integer kernels (QLinearConv / QGemm). ``int4w`` weights are exported as int8 values in ``[-7, 7]`` (the
values the TVM module computes with; ONNX's packed INT4 needs opset 21). ``fp16`` layers keep float32
activations and carry their weights rounded to float16 (ONNX Runtime's CPU has few fp16 kernels).
"""

from __future__ import annotations

import os

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .calibration import Calibration
from .errors import OHQError
from .frontend import MIN_OPSET, ImportedModel
from .jsonfile import write_atomic
from .onnx_fold import fold_batch_norms
from .passes.layer_id import LAYERS_ATTR
from .plan import Plan
from .precision import Precision
from .qparams import bias_safe_scales, quantize_weight


def _weight_axis(node: onnx.NodeProto) -> int:
    """Axis of the output channels in the node's weight initializer."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    return 1  # MatMul: [K, N]


def export_qdq(
    imported: ImportedModel,
    plan: Plan,
    calibration: Calibration | None,
    path: str | os.PathLike | None = None,
) -> onnx.ModelProto:
    """The imported model with ``plan`` applied as QDQ nodes; written to ``path`` when given.

    Raises :class:`OHQError` when integer layers lack calibration, a layer's ONNX node cannot be found,
    or the model's opset is below 13 (per-channel QDQ).
    """
    opset = next((o.version for o in imported.onnx_model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < MIN_OPSET:  # load_onnx upgrades older models; this one was imported some other way
        raise OHQError(
            f"QDQ export needs ONNX opset >= {MIN_OPSET} (per-channel quantization); the model has {opset}"
        )
    func = imported.mod["main"]
    layer_nodes = {str(k): str(v) for k, v in func.attrs[LAYERS_ATTR].items()}
    by_node = {node: layer for layer, node in layer_nodes.items() if node}
    model, _ = fold_batch_norms(imported.onnx_model)
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    found = {node.name for node in graph.node}
    for layer_id, precision in plan.assignments.items():
        if precision is not Precision.FP32 and layer_nodes.get(layer_id, "") not in found:
            raise OHQError(f"layer {layer_id!r} has no ONNX node to export")
        if precision.is_integer and (calibration is None or layer_id not in calibration.ranges):
            raise OHQError(f"layer {layer_id!r} is {precision} but has no calibration range")

    added: list[onnx.TensorProto] = []
    activation_dq: dict[tuple[str, float, int], str] = {}
    nodes: list[onnx.NodeProto] = []

    def constant(name: str, array: np.ndarray) -> str:
        added.append(numpy_helper.from_array(array, name))
        return name

    for node in graph.node:
        layer_id = by_node.get(node.name)
        precision = plan.assignments.get(layer_id) if layer_id else None
        if precision is None or precision is Precision.FP32:
            nodes.append(node)
            continue
        weight_name = node.input[1]
        if weight_name not in initializers:
            raise OHQError(f"layer {layer_id!r}: weight {weight_name!r} is not an initializer")
        weight = numpy_helper.to_array(initializers[weight_name]).astype(np.float32)
        inputs = list(node.input)
        prefix = f"{layer_id}_qdq"
        if precision is Precision.FP16:
            inputs[1] = constant(f"{prefix}_w_fp16", weight.astype(np.float16).astype(np.float32))
            nodes.append(helper.make_node(node.op_type, inputs, list(node.output), name=node.name))
            nodes[-1].attribute.extend(node.attribute)
            continue
        qp = calibration.qparams(layer_id)
        key = (inputs[0], qp.scale, qp.zero_point)
        if key not in activation_dq:
            scale = constant(f"{prefix}_x_scale", np.array(qp.scale, np.float32))
            zero = constant(f"{prefix}_x_zero", np.array(qp.zero_point, np.uint8))
            nodes.append(helper.make_node("QuantizeLinear", [inputs[0], scale, zero], [f"{prefix}_x_q"]))
            nodes.append(
                helper.make_node("DequantizeLinear", [f"{prefix}_x_q", scale, zero], [f"{prefix}_x"])
            )
            activation_dq[key] = f"{prefix}_x"
        inputs[0] = activation_dq[key]
        axis = _weight_axis(node)
        bias_values = None
        if len(inputs) > 2 and inputs[2] in initializers:
            bias_values = numpy_helper.to_array(initializers[inputs[2]]).astype(np.float32)
        qw = quantize_weight(weight, precision, axis, bias_safe_scales(bias_values, qp.scale))
        channels = qw.scales.size
        w_q = constant(f"{prefix}_w_q", qw.values)
        w_scale = constant(f"{prefix}_w_scale", qw.scales)
        w_zero = constant(f"{prefix}_w_zero", np.zeros(channels, np.int8))
        nodes.append(helper.make_node("DequantizeLinear", [w_q, w_scale, w_zero], [f"{prefix}_w"], axis=axis))
        inputs[1] = f"{prefix}_w"
        if len(inputs) > 2 and inputs[2]:
            if inputs[2] not in initializers:
                raise OHQError(f"layer {layer_id!r}: bias {inputs[2]!r} is not an initializer")
            bias = numpy_helper.to_array(initializers[inputs[2]]).astype(np.float32)
            bias_scale = (np.float32(qp.scale) * qw.scales).astype(np.float32)
            if bias.size != channels:
                raise OHQError(f"layer {layer_id!r}: bias is not per output channel")
            b_q = constant(f"{prefix}_b_q", np.rint(bias.reshape(-1) / bias_scale).astype(np.int32))
            b_scale = constant(f"{prefix}_b_scale", bias_scale)
            b_zero = constant(f"{prefix}_b_zero", np.zeros(channels, np.int32))
            dq_bias = f"{prefix}_b"
            nodes.append(helper.make_node("DequantizeLinear", [b_q, b_scale, b_zero], [dq_bias], axis=0))
            if bias.shape != (channels,):
                shape = constant(f"{prefix}_b_shape", np.array(bias.shape, np.int64))
                nodes.append(helper.make_node("Reshape", [dq_bias, shape], [f"{prefix}_b_shaped"]))
                dq_bias = f"{prefix}_b_shaped"
            inputs[2] = dq_bias
        replacement = helper.make_node(node.op_type, inputs, list(node.output), name=node.name)
        replacement.attribute.extend(node.attribute)
        nodes.append(replacement)

    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(added)
    used = {name for node in graph.node for name in node.input}
    kept = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    model.producer_name = "ohq-tvm"
    helper.set_model_props(
        model,
        {
            "ohq_tvm.plan": str({k: v.value for k, v in plan.assignments.items()}),
            "ohq_tvm.target": plan.target,
        },
    )
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as err:
        raise OHQError(f"the QDQ model is invalid: {str(err).splitlines()[0]}") from None
    if path is not None:
        write_atomic(path, model.SerializeToString(), "QDQ model")
    return model


__all__ = ["export_qdq"]
