"""Give every layer switchable precision paths selected at run time by a mask input (for MQE).

``InsertPrecisionMasks(precisions, calibration)`` adds a last parameter ``ohq_mask`` of shape
``[num_layers, len(precisions)]`` (float32) to ``main``. Each layer computes its float32 result ``y``
and, for each precision ``p``, a simulated result ``y_p`` (the same conv/matmul on the input and weight
rounded the way ``p`` rounds them: uint8 per-tensor input with the calibrated scale and zero point and
per-channel int8/int4 weights for integer precisions, float16 for fp16), and returns
``y + Σ_p mask[l, p] · (y_p − y)``. A one-hot mask row switches exactly one layer to one precision; an
all-zero mask is the float32 model. So one compiled module answers "what if layer ``l`` alone ran in
``p``" for every ``l`` and ``p``. Layer ``l`` is row ``l`` in program order (:func:`mask_layout`).

Raises :class:`~ohq_tvm.errors.OHQError` for integer precisions without a calibration range for a layer,
for a module that already has masks or a plan applied, and for one whose layers ``LegalizeOps`` has
already lowered to TIR.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from ohq_tvm.errors import OHQError
from ohq_tvm.precision import Precision
from ohq_tvm.qparams import quantize_weight

from .apply_plan import PLAN_ATTR, layer_weight
from .layer_compute import LayerSpec
from .layer_graph import layer_graph
from .layer_id import check_not_lowered

MASK_PARAM = "ohq_mask"
MASK_ATTR = "ohq_mask_layout"


def _simulated_input(x: relax.Expr, precision: Precision, qp) -> relax.Expr:
    if precision is Precision.FP16:
        return relax.op.astype(relax.op.astype(x, "float16"), "float32")
    scale, zero_point = relax.const(qp.scale, "float32"), relax.const(qp.zero_point, "int32")
    quantized = relax.op.quantize(x, scale, zero_point, axis=-1, out_dtype="uint8")
    return relax.op.dequantize(quantized, scale, zero_point, axis=-1, out_dtype="float32")


def _simulated_weight(layer: LayerSpec, precision: Precision) -> np.ndarray:
    if precision is Precision.FP16:
        return layer.weight.astype(np.float16).astype(np.float32)
    return quantize_weight(layer.weight, precision, layer.channel_axis_of_weight).dequantize()


@mutator
class _MaskInserter(PyExprMutator):
    def __init__(self, mod: tvm.IRModule, precisions, calibration, mask: relax.Var) -> None:
        super().__init__(mod)
        self.graph = layer_graph(mod["main"])
        self.rows = {node.binding.var: (row, node) for row, node in enumerate(self.graph.nodes.values())}
        self.precisions = precisions
        self.calibration = calibration
        self.mask = mask

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        found = self.rows.get(binding.var)
        if found is None:
            super().visit_var_binding_(binding)
            return
        row, node = found
        call = binding.value
        data = self.visit_expr(call.args[0])
        layer = LayerSpec.from_call(call, layer_weight(call, self.graph.values))
        exact = self.builder_.emit(layer.float_compute(data, "float32"))
        result: relax.Expr = exact
        for column, precision in enumerate(self.precisions):
            qp = self.calibration.qparams(node.layer_id) if precision.is_integer else None
            simulated_data = self.builder_.emit(_simulated_input(data, precision, qp))
            simulated = LayerSpec(
                _simulated_weight(layer, precision),
                layer.conv,
                layer.strides,
                layer.padding,
                layer.dilation,
                layer.groups,
            ).float_compute(simulated_data, "float32")
            delta = self.builder_.emit(relax.op.subtract(self.builder_.emit(simulated), exact))
            switch = relax.op.strided_slice(self.mask, [0, 1], [row, column], [row + 1, column + 1])
            switch = relax.op.reshape(switch, [1] * len(binding.var.ty.shape))
            result = self.builder_.emit(relax.op.add(result, relax.op.multiply(delta, switch)))
        renamed = relax.Var(binding.var.name, binding.var.ty)
        self.builder_.emit_normalized(relax.VarBinding(renamed, result))
        self.set_var_remap(binding.var, renamed)


@tvm.transform.module_pass(opt_level=0, name="InsertPrecisionMasks")
class InsertPrecisionMasks:
    """See the module docstring. ``precisions`` excludes fp32 (row/column 0 is not reserved for it)."""

    def __init__(self, precisions, calibration=None) -> None:
        self.precisions = [Precision.parse(str(p)) for p in precisions]
        if not self.precisions or Precision.FP32 in self.precisions:
            raise OHQError("mask precisions are the lower precisions to simulate, without fp32")
        self.calibration = calibration

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        func = mod["main"]
        if func.attrs and (PLAN_ATTR in func.attrs or MASK_ATTR in func.attrs):
            raise OHQError("insert masks into the imported model, not one already rewritten")
        check_not_lowered(mod, "InsertPrecisionMasks")
        graph = layer_graph(func)
        if any(p.is_integer for p in self.precisions):
            if self.calibration is None:
                raise OHQError("integer precisions need a calibration to simulate; calibrate the model first")
            missing = [lid for lid in graph.nodes if lid not in self.calibration.ranges]
            if missing:
                raise OHQError(f"the calibration has no range for layer(s) {', '.join(missing)}")
        mask = relax.Var(MASK_PARAM, relax.TensorType((len(graph.nodes), len(self.precisions)), "float32"))
        flat = relax.transform.ToNonDataflow()(mod)
        inserter = _MaskInserter(flat, self.precisions, self.calibration, mask)
        rewritten = inserter.visit_expr(flat["main"])
        params = [*rewritten.params, mask]
        new_func = relax.Function(
            params, rewritten.body, rewritten.ret_ty, rewritten.is_pure, rewritten.attrs
        )
        layout = {"layers": list(graph.nodes), "precisions": [p.value for p in self.precisions]}
        new_func = new_func.with_attr(MASK_ATTR, layout).with_attr("num_input", len(params))
        result = inserter.builder_.get()
        result["main"] = new_func
        result = relax.transform.Normalize()(result)
        return relax.transform.ConvertToDataflow()(result)


def mask_layout(mod: tvm.IRModule) -> tuple[list[str], list[Precision]]:
    """(layer ids by mask row, precisions by mask column) of a masked module."""
    layout = mod["main"].attrs[MASK_ATTR]
    return [str(x) for x in layout["layers"]], [Precision(str(p)) for p in layout["precisions"]]


__all__ = ["MASK_ATTR", "MASK_PARAM", "InsertPrecisionMasks", "mask_layout"]
