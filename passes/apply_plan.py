"""Rewrite a model to a mixed-precision plan with real integer compute.

Per layer (see :mod:`ohq_tvm.qparams` for the arithmetic):

- ``fp32``: unchanged.
- ``fp16``: input cast to float16, weight stored in float16, the conv/matmul computed in float16, the result
  cast back to float32.
- ``int8``: weight stored as int8 (symmetric, per output channel); input quantized to uint8 with the
  calibrated per-tensor scale/zero point; ``conv2d``/``matmul`` on uint8 × int8 with int32 accumulation;
  zero-point compensation and the bias folded into the int32 accumulator.
- ``int4w``: as ``int8``, but the weight is stored as int4 packed two per byte and unpacked inside the
  layer's own TIR kernel (TVM's int4 storage is broken, and a separate unpack op over a constant would be
  folded back to int8 by ``FoldConstant``).

A quantized layer absorbs the bias ``add`` and a following ``relu``/``clip`` when it is their only user.
Its result is then materialised only in the forms its users need: when an integer layer reads it, as uint8
straight from the int32 accumulator (one requantize: scale, round, shift, clip; never a dequantize
followed by a quantize); when anything else reads it, as float32 through ``dequantize``. So ``quantize``
and ``dequantize`` appear only at precision boundaries.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import tvm
from tvm import relax
from tvm.ir.expr import Constant
from tvm.relax.expr_functor import PyExprMutator, mutator

from ohq_tvm.errors import PlanError
from ohq_tvm.precision import Precision
from ohq_tvm.qparams import ActivationQParams

from .annotate import candidates
from .layer_compute import (
    LayerSpec,
    emit_accumulator,
    emit_dequantize,
    emit_half,
    emit_quantize,
    emit_requantize,
)
from .layer_graph import LayerNode, layer_graph
from .layer_id import check_not_lowered, identified_layers

PLAN_ATTR = "ohq_plan"


def layer_weight(call: relax.Call, values: Mapping[relax.Var, relax.Expr]) -> np.ndarray:
    """The constant weight of a layer call as the call sees it (through a ``permute_dims``), as numpy."""

    def resolve(expr: relax.Expr) -> relax.Expr:
        while isinstance(expr, relax.Var) and expr in values:
            expr = values[expr]
        return expr

    weight, permuted, axes = resolve(call.args[1]), False, None
    if isinstance(weight, relax.Call) and weight.op.name == "relax.permute_dims":
        permuted = True
        axes = [int(a) for a in weight.attrs.axes] if weight.attrs.axes is not None else None
        weight = resolve(weight.args[0])
    if not isinstance(weight, Constant):
        raise PlanError("layer weight is not a constant")
    array = weight.value.numpy()
    return np.transpose(array, axes) if permuted else array


@mutator
class _PlanRewriter(PyExprMutator):
    def __init__(self, mod: tvm.IRModule, plan, calibration) -> None:
        super().__init__(mod)
        self.plan = plan
        self.calibration = calibration
        self.graph = layer_graph(mod["main"])
        self.by_call = {node.binding.var: node for node in self.graph.nodes.values()}
        self.absorbed: set[relax.Var] = set()
        self.twins: dict[relax.Var, tuple[relax.Var, ActivationQParams]] = {}
        self.halves: dict[relax.Var, relax.Var] = {}

    def _precision(self, var: relax.Var) -> Precision:
        node = self.by_call.get(var)
        return self.plan.precision_of(node.layer_id) if node is not None else Precision.FP32

    def _float(self, var: relax.Expr) -> relax.Expr:
        return self.visit_expr(var)

    def _quantized_input(self, data: relax.Expr, qp: ActivationQParams) -> relax.Expr:
        twin = self.twins.get(data) if isinstance(data, relax.Var) else None
        if twin is not None and twin[1] == qp:
            return twin[0]
        quantized = emit_quantize(self.builder_, self._float(data), qp)
        if isinstance(data, relax.Var):
            self.twins[data] = (quantized, qp)
        return quantized

    # -- the rewrite ----------------------------------------------------------------------------------
    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        if binding.var in self.absorbed:
            return
        precision = self._precision(binding.var)
        if precision.is_integer:
            self._integer_layer(self.by_call[binding.var], precision)
        elif precision is Precision.FP16:
            self._half_layer(binding)
        else:
            value = self.visit_expr(binding.value)
            self.builder_.emit_normalized(relax.VarBinding(binding.var, value))

    def _spec(self, node: LayerNode) -> LayerSpec:
        return LayerSpec.from_call(node.call, layer_weight(node.call, self.graph.values))

    def _half_layer(self, binding: relax.VarBinding) -> None:
        node = self.by_call[binding.var]
        data = node.call.args[0]
        half = self.halves.get(data)
        if half is None:
            half = self.builder_.emit(relax.op.astype(self._float(data), "float16"))
            if isinstance(data, relax.Var):
                self.halves[data] = half
        self.set_var_remap(binding.var, emit_half(self.builder_, half, self._spec(node), binding.var.name))

    def _integer_layer(self, node: LayerNode, precision: Precision) -> None:
        layer = self._spec(node)
        if not layer.conv and layer.weight.ndim != 2:
            raise PlanError(f"layer {node.layer_id!r}: only 2-D matmul weights can be quantized")
        qp = self.calibration.qparams(node.layer_id)
        data = self._quantized_input(node.call.args[0], qp)
        out_ndim = len(node.binding.var.ty.shape)
        acc = emit_accumulator(
            self.builder_, data, layer, precision, qp, node.bias, out_ndim, node.binding.var.name
        )
        self.absorbed.update(node.epilogue)
        end = node.end
        integer_readers = [r for r in node.readers if r is not None and self.plan.precision_of(r).is_integer]
        needs_float = len(integer_readers) < len(node.readers)
        if integer_readers:
            out_qp = self.calibration.qparams(integer_readers[0])
            self.twins[end] = (emit_requantize(self.builder_, acc, out_qp, node.bounds), out_qp)
            # Readers calibrated differently (a user-edited calibration) re-quantize from float.
            needs_float |= any(self.calibration.qparams(r) != out_qp for r in integer_readers)
        if needs_float:
            self.set_var_remap(end, emit_dequantize(self.builder_, acc, node.bounds))


@tvm.transform.module_pass(opt_level=0, name="ApplyPlan")
class ApplyPlan:
    """Rewrite ``main`` so each layer computes in the precision ``plan`` gives it.

    ``calibration`` (a :class:`ohq_tvm.calibration.Calibration`) gives the input range of every integer
    layer; it may be ``None`` only when the plan has no ``int8``/``int4w`` layer. The module needs layer
    ids (``AssignLayerIds``); when it was annotated (``AnnotateCandidates``) each precision must be among
    the layer's candidates. Records the plan as the function attribute ``ohq_plan``.

    Raises :class:`ohq_tvm.errors.PlanError` for a plan that does not fit the model (unknown or missing
    layer, precision not allowed), integer layers without calibration, or a module already rewritten;
    :class:`~ohq_tvm.errors.OHQError` for a module whose layers ``LegalizeOps`` has already lowered to TIR.
    """

    def __init__(self, plan, calibration=None) -> None:
        self.plan = plan
        self.calibration = calibration

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        func = mod["main"]
        if func.attrs and PLAN_ATTR in func.attrs:
            raise PlanError("this module already has a plan applied; apply plans to the imported model")
        check_not_lowered(mod, "ApplyPlan")
        layer_ids = [layer_id for layer_id, _ in identified_layers(func)]
        self.plan.validate_against(layer_ids, candidates(mod) or None)
        integer = [lid for lid, p in self.plan.assignments.items() if p.is_integer]
        if integer:
            if self.calibration is None:
                raise PlanError(
                    f"the plan puts {len(integer)} layer(s) in integer precision but no calibration was "
                    "given; calibrate the model first (ohq_tvm.calibration.calibrate)"
                )
            missing = [lid for lid in integer if lid not in self.calibration.ranges]
            if missing:
                raise PlanError(f"the calibration has no range for layer(s) {', '.join(missing)}")
        flat = relax.transform.ToNonDataflow()(mod)
        rewriter = _PlanRewriter(flat, self.plan, self.calibration)
        rewritten = rewriter.visit_expr(flat["main"])
        result = rewriter.builder_.get()
        assignments = {k: v.value for k, v in self.plan.assignments.items()}
        result["main"] = rewritten.with_attr(PLAN_ATTR, assignments)
        result = relax.transform.DeadCodeElimination(["main"])(result)
        return relax.transform.ConvertToDataflow()(result)


def applied_plan(mod: tvm.IRModule) -> dict[str, Precision]:
    """The plan recorded on a rewritten module, ``{}`` for one not rewritten."""
    func = mod["main"]
    if not func.attrs or PLAN_ATTR not in func.attrs:
        return {}
    return {str(k): Precision(str(v)) for k, v in func.attrs[PLAN_ATTR].items()}


__all__ = ["PLAN_ATTR", "ApplyPlan", "applied_plan", "layer_weight"]
