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

from collections import defaultdict
from collections.abc import Mapping

import numpy as np
import tvm
from tvm import relax, te
from tvm.ir.expr import Constant
from tvm.relax.expr_functor import PyExprMutator, mutator

from ohq_tvm.errors import OHQError
from ohq_tvm.precision import Precision
from ohq_tvm.qparams import (
    ACTIVATION_DTYPE,
    ACTIVATION_QMAX,
    ACTIVATION_QMIN,
    ActivationQParams,
    QuantizedWeight,
    pack_int4,
    quantize_weight,
)

from .annotate import candidates
from .layer_id import bound_values, layer_bindings, layer_id_of

PLAN_ATTR = "ohq_plan"


def _plan_error(message: str) -> OHQError:
    from ohq_tvm.plan import PlanError  # ohq_tvm.plan imports ohq_tvm.layers, which imports this package

    return PlanError(message)


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
        raise _plan_error("layer weight is not a constant")
    array = weight.value.numpy()
    return np.transpose(array, axes) if permuted else array


def _channel_constant(value: Constant, channels: int, conv: bool) -> np.ndarray | None:
    """A bias-like constant as a per-channel vector, if it broadcasts along the output channels only."""
    array = value.value.numpy()
    if array.dtype != np.float32:
        return None
    shape = array.shape
    if array.size == 1:
        return np.full(channels, array.reshape(()), np.float32)
    if conv and len(shape) in (3, 4) and shape[-3] == channels and array.size == channels:
        return array.reshape(channels)
    if not conv and shape[-1] == channels and array.size == channels:
        return array.reshape(channels)
    return None


def _clip_bounds(call: relax.Call) -> tuple[float, float] | None:
    """(low, high) of a ``relu`` or a ``clip`` with constant bounds."""
    if call.op.name == "relax.nn.relu":
        return 0.0, np.inf
    if call.op.name == "relax.clip":
        low, high = call.args[1], call.args[2]
        if isinstance(low, relax.PrimValue) and isinstance(high, relax.PrimValue):
            return float(low.value.value), float(high.value.value)
    return None


def _int4_at(packed, index):
    """Value ``index`` of a :func:`~ohq_tvm.qparams.pack_int4` buffer, as int32, read in the kernel."""
    byte = packed[index // 2].astype("int32")
    return ((byte >> ((index % 2) * 4)) & 15) - 8


def _te_int4_conv2d(data, packed, weight_shape, strides, dilation, groups):
    """uint8 × packed-int4 conv2d (NCHW/OIHW, data already padded) accumulating in int32."""
    out_c, cin_group, kh, kw = weight_shape
    n, _, height, width = data.shape
    out_h = (height - (kh - 1) * dilation[0] - 1) // strides[0] + 1
    out_w = (width - (kw - 1) * dilation[1] - 1) // strides[1] + 1
    per_group = out_c // groups
    rc = te.reduce_axis((0, cin_group), "rc")
    rh = te.reduce_axis((0, kh), "rh")
    rw = te.reduce_axis((0, kw), "rw")

    def weight_at(o, c, h, w):
        return _int4_at(packed, ((o * cin_group + c) * kh + h) * kw + w)

    return te.compute(
        (n, out_c, out_h, out_w),
        lambda b, o, y, x: te.sum(
            data[
                b,
                (o // per_group) * cin_group + rc,
                y * strides[0] + rh * dilation[0],
                x * strides[1] + rw * dilation[1],
            ].astype("int32")
            * weight_at(o, rc, rh, rw),
            axis=[rc, rh, rw],
        ),
        name="conv2d_int4w",
    )


def _te_int4_dense(data, packed, weight_shape):
    """uint8 [..., K] × packed-int4 [K, N] accumulating in int32."""
    reduction, columns = weight_shape
    rk = te.reduce_axis((0, reduction), "rk")

    def weight_at(k, j):
        return _int4_at(packed, k * columns + j)

    return te.compute(
        (*data.shape[:-1], columns),
        lambda *idx: te.sum(
            data[(*idx[:-1], rk)].astype("int32") * weight_at(rk, idx[-1]),
            axis=rk,
        ),
        name="dense_int4w",
    )


@mutator
class _PlanRewriter(PyExprMutator):
    def __init__(self, mod: tvm.IRModule, plan, calibration) -> None:
        super().__init__(mod)
        func = mod["main"]
        self.plan = plan
        self.calibration = calibration
        self.values = bound_values(func)
        self.uses: dict[relax.Var, list[relax.VarBinding | None]] = defaultdict(list)
        for block in func.body.blocks:
            for binding in block.bindings:
                for var in relax.analysis.free_vars(binding.value):
                    self.uses[var].append(binding)
        for var in relax.analysis.free_vars(func.body.body):
            self.uses[var].append(None)  # None: the function's result
        self.layers = {b.var: layer_id_of(b.var) for b in layer_bindings(func)}
        self.absorbed: set[relax.Var] = set()
        self.twins: dict[relax.Var, tuple[relax.Var, ActivationQParams]] = {}
        self.halves: dict[relax.Var, relax.Var] = {}

    # -- what a variable's readers need ---------------------------------------------------------------
    def _precision(self, var: relax.Var) -> Precision:
        layer_id = self.layers.get(var)
        return self.plan.precision_of(layer_id) if layer_id is not None else Precision.FP32

    def _integer_reader(self, binding: relax.VarBinding | None, var: relax.Var) -> str | None:
        """The layer id if ``binding`` is an integer layer reading ``var`` as its data input."""
        if binding is None or binding.var not in self.layers:
            return None
        if not self._precision(binding.var).is_integer or not binding.value.args[0].same_as(var):
            return None
        return self.layers[binding.var]

    def _float(self, var: relax.Expr) -> relax.Expr:
        return self.visit_expr(var)

    def _emit(self, expr: relax.Expr, name: str = "") -> relax.Var:
        return self.builder_.emit(expr, name_hint=name) if name else self.builder_.emit(expr)

    def _quantized_input(self, data: relax.Expr, qp: ActivationQParams) -> relax.Expr:
        twin = self.twins.get(data) if isinstance(data, relax.Var) else None
        if twin is not None and twin[1] == qp:
            return twin[0]
        quantized = self._emit(
            relax.op.quantize(
                self._float(data),
                relax.const(qp.scale, "float32"),
                relax.const(qp.zero_point, "int32"),
                axis=-1,
                out_dtype=ACTIVATION_DTYPE,
            )
        )
        if isinstance(data, relax.Var):
            self.twins[data] = (quantized, qp)
        return quantized

    # -- the rewrite ----------------------------------------------------------------------------------
    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        if binding.var in self.absorbed:
            return
        precision = self._precision(binding.var)
        if precision.is_integer:
            self._integer_layer(binding, precision)
        elif precision is Precision.FP16:
            self._half_layer(binding)
        else:
            value = self.visit_expr(binding.value)
            self.builder_.emit_normalized(relax.VarBinding(binding.var, value))

    def _half_layer(self, binding: relax.VarBinding) -> None:
        call = binding.value
        data = call.args[0]
        half = self.halves.get(data)
        if half is None:
            half = self._emit(relax.op.astype(self._float(data), "float16"))
            if isinstance(data, relax.Var):
                self.halves[data] = half
        weight = relax.const(layer_weight(call, self.values).astype(np.float16))
        if call.op.name == "relax.nn.conv2d":
            a = call.attrs
            compute = relax.op.nn.conv2d(
                half, weight, a.strides, a.padding, a.dilation, a.groups, out_dtype="float16"
            )
        else:
            compute = relax.op.matmul(half, weight, out_dtype="float16")
        result = self._emit(compute, binding.var.name)
        self.set_var_remap(binding.var, self._emit(relax.op.astype(result, "float32")))

    def _sole_call_reader(self, var: relax.Var) -> relax.VarBinding | None:
        """The binding of the one call that reads ``var``, if nothing else (the result included) does."""
        readers = self.uses[var]
        if len(readers) == 1 and readers[0] is not None and isinstance(readers[0].value, relax.Call):
            return readers[0]
        return None

    def _chain(self, binding: relax.VarBinding, channels: int, conv: bool):
        """Follow the layer's bias add and activation while the layer is their only input user."""
        end, bias, bounds = binding.var, None, None
        reader = self._sole_call_reader(end)
        if reader is not None and reader.value.op.name == "relax.add":
            value = reader.value
            other = value.args[1] if value.args[0].same_as(end) else value.args[0]
            other = self.values.get(other, other)
            if isinstance(other, Constant):
                bias = _channel_constant(other, channels, conv)
                if bias is not None:
                    end = reader.var
                    self.absorbed.add(end)
        reader = self._sole_call_reader(end)
        if reader is not None:
            bounds = _clip_bounds(reader.value)
            if bounds is not None:
                end = reader.var
                self.absorbed.add(end)
        return end, bias, bounds

    def _integer_layer(self, binding: relax.VarBinding, precision: Precision) -> None:
        call = binding.value
        layer_id = self.layers[binding.var]
        conv = call.op.name == "relax.nn.conv2d"
        weight = layer_weight(call, self.values)
        if not conv and weight.ndim != 2:
            raise _plan_error(f"layer {layer_id!r}: only 2-D matmul weights can be quantized")
        axis = 0 if conv else 1
        qw: QuantizedWeight = quantize_weight(weight, precision, axis)
        channels = weight.shape[axis]
        qp = self.calibration.qparams(layer_id)
        data = self._quantized_input(call.args[0], qp)
        out_ndim = len(binding.var.ty.shape)
        channel_shape = [1] * out_ndim
        channel_shape[1 if conv else -1] = channels

        if conv:
            a = call.attrs
            padding = [int(p) for p in a.padding]
            if any(padding) and (qp.zero_point != 0 or precision is Precision.INT4W):
                top, left, bottom, right = padding
                data = self._emit(
                    relax.op.nn.pad(
                        data, [0, 0, 0, 0, top, bottom, left, right], pad_value=float(qp.zero_point)
                    )
                )
                padding = [0, 0, 0, 0]
            if precision is Precision.INT8:
                compute = relax.op.nn.conv2d(
                    data, relax.const(qw.values), a.strides, padding, a.dilation, a.groups, out_dtype="int32"
                )
            else:
                compute = self.builder_.call_te(
                    _te_int4_conv2d,
                    data,
                    relax.const(pack_int4(qw.values)),
                    weight_shape=tuple(weight.shape),
                    strides=[int(s) for s in a.strides],
                    dilation=[int(d) for d in a.dilation],
                    groups=int(a.groups),
                    primfunc_name_hint="conv2d_int4w",
                )
        elif precision is Precision.INT8:
            compute = relax.op.matmul(data, relax.const(qw.values), out_dtype="int32")
        else:
            compute = self.builder_.call_te(
                _te_int4_dense,
                data,
                relax.const(pack_int4(qw.values)),
                weight_shape=tuple(weight.shape),
                primfunc_name_hint="dense_int4w",
            )
        acc = self._emit(compute, binding.var.name)

        end, bias, bounds = self._chain(binding, channels, conv)
        scale_out = (np.float32(qp.scale) * qw.scales).astype(np.float32)
        offset = np.zeros(channels, np.int64)
        if qp.zero_point:
            offset -= qp.zero_point * qw.channel_sums()
        if bias is not None:
            offset += np.rint(bias / scale_out).astype(np.int64)
        if np.any(offset):
            constant = relax.const(offset.astype(np.int32).reshape(channel_shape))
            acc = self._emit(relax.op.add(acc, constant))

        readers = self.uses[end]
        integer_readers = [r for r in (self._integer_reader(b, end) for b in readers) if r is not None]
        needs_float = len(integer_readers) < len(readers)
        if integer_readers:
            out_qp = self.calibration.qparams(integer_readers[0])
            self.twins[end] = (self._requantize(acc, scale_out, channel_shape, out_qp, bounds), out_qp)
            # Readers calibrated differently (a user-edited calibration) re-quantize from float.
            needs_float |= any(self.calibration.qparams(r) != out_qp for r in integer_readers)
        if needs_float:
            result = self._emit(
                relax.op.dequantize(
                    acc,
                    relax.const(scale_out),
                    relax.const(0, "int32"),
                    axis=1 if conv else out_ndim - 1,
                    out_dtype="float32",
                )
            )
            if bounds is not None:
                low, high = bounds
                result = self._emit(
                    relax.op.nn.relu(result) if np.isinf(high) else relax.op.clip(result, low, high)
                )
            self.set_var_remap(end, result)

    def _requantize(self, acc, scale_out, channel_shape, qp: ActivationQParams, bounds) -> relax.Var:
        """int32 accumulator → uint8 in ``qp``, with the absorbed activation as the clip bounds."""
        multiplier = (scale_out / np.float32(qp.scale)).astype(np.float32).reshape(channel_shape)
        low, high = float(ACTIVATION_QMIN), float(ACTIVATION_QMAX)
        if bounds is not None:
            low = max(low, qp.level(bounds[0]))
            if np.isfinite(bounds[1]):
                high = min(high, qp.level(bounds[1]))
        scaled = self._emit(relax.op.multiply(relax.op.astype(acc, "float32"), relax.const(multiplier)))
        shifted = relax.op.round(scaled)
        if qp.zero_point:
            shifted = relax.op.add(shifted, relax.const(float(qp.zero_point), "float32"))
        return self._emit(relax.op.astype(relax.op.clip(shifted, low, high), ACTIVATION_DTYPE))


@tvm.transform.module_pass(opt_level=0, name="ApplyPlan")
class ApplyPlan:
    """Rewrite ``main`` so each layer computes in the precision ``plan`` gives it.

    ``calibration`` (a :class:`ohq_tvm.calibration.Calibration`) gives the input range of every integer
    layer; it may be ``None`` only when the plan has no ``int8``/``int4w`` layer. The module needs layer
    ids (``AssignLayerIds``); when it was annotated (``AnnotateCandidates``) each precision must be among
    the layer's candidates. Records the plan as the function attribute ``ohq_plan``.

    Raises :class:`ohq_tvm.plan.PlanError` for a plan that does not fit the model (unknown or missing
    layer, precision not allowed), integer layers without calibration, or a module already rewritten.
    """

    def __init__(self, plan, calibration=None) -> None:
        self.plan = plan
        self.calibration = calibration

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        from ohq_tvm.layers import quantizable_layers

        func = mod["main"]
        if func.attrs and PLAN_ATTR in func.attrs:
            raise _plan_error("this module already has a plan applied; apply plans to the imported model")
        layers = quantizable_layers(mod)
        self.plan.validate_against(layers, candidates(mod) or None)
        integer = [lid for lid, p in self.plan.assignments.items() if p.is_integer]
        if integer:
            if self.calibration is None:
                raise _plan_error(
                    f"the plan puts {len(integer)} layer(s) in integer precision but no calibration was "
                    "given; calibrate the model first (ohq_tvm.calibration.calibrate)"
                )
            missing = [lid for lid in integer if lid not in self.calibration.ranges]
            if missing:
                raise _plan_error(f"the calibration has no range for layer(s) {', '.join(missing)}")
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
