"""Replace conv2d/matmul layers with ohq-tvm's CPU kernels (:mod:`ohq_tvm.kernels`).

After :class:`~passes.apply_plan.ApplyPlan`, an ``int8`` layer is ``relax.nn.conv2d`` (or ``matmul``) of
uint8 activations with a constant int8 weight, accumulating in int32, usually followed by an ``add`` of a
constant per-channel int32 vector (bias and zero-point compensation). On a target with a dot-product
instruction (x86 AVX-512 VNNI / AVX-VNNI, AArch64 ``+dotprod``: see :mod:`ohq_tvm.kernels.isa`) this pass
rewrites each such call into a ``call_tir`` of :mod:`ohq_tvm.kernels.int8_dot`, with the weight packed
offline into the instruction's layout and that ``add`` folded into the kernel's output stage.

Rewritten:

- integer ``conv2d`` NCHW/OIHW with ``groups == 1`` (regular and 1×1): with lanes over output pixels
  (:func:`~ohq_tvm.kernels.int8_dot.conv2d_dot_pixels`) when the column stride is 1 and a lane count the
  target runs divides the output rows (MobileNet's 112- and 56-wide maps), else with lanes over output
  channels (:func:`~ohq_tvm.kernels.int8_dot.conv2d_dot`); integer ``matmul`` with a 2-D constant
  ``[K, N]`` weight;
- float32 1×1 stride-1 convs over maps that the target's fp32 vector width does not divide (14×14 and
  7×7 on AVX2): the channel form in float32 (``fma_*`` of :mod:`ohq_tvm.kernels.isa`), lanes over output
  channels, where the default schedule's vectors along the pixels would be short;
- depthwise convs, integer and float32, on every CPU target: :mod:`ohq_tvm.kernels.depthwise` (padded
  float planes; the integer one exact in float32 arithmetic, faster than int32 multiplies).

An explicit ``pad`` in front of an integer layer (ApplyPlan pads with the activation zero point) is
folded into the kernel when the layer is its only reader. Left as they are: grouped convs that are not
depthwise, int4w layers (their own TE kernel), other float regular convs and dense layers, and integer
regular layers on a target without a dot-product instruction. The rewrite is exact: the integer kernels
compute the same int32 values (the float one agrees with the schedule it replaces to float rounding).
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import tvm
from tvm import relax
from tvm.ir.expr import Constant
from tvm.relax.expr_functor import PyExprMutator, mutator
from tvm.target import Target

from ohq_tvm.kernels import (
    MAX_EXACT_TAPS,
    DotProductISA,
    conv2d_dot,
    conv2d_dot_pixels,
    dense_dot,
    depthwise_conv2d_planes,
    float_isa,
    pack_conv2d_weight,
    pack_conv2d_weight_pixels,
    pack_dense_weight,
    pixel_lanes,
    usable_isas,
)

_CONV = "relax.nn.conv2d"
_MATMUL = "relax.matmul"
_OUT_ELEMWISE_FUSABLE = 4  # relax OpPatternKind::kOutEWiseFusable


def _dtype(expr: relax.Expr) -> str:
    return str(getattr(expr.ty, "dtype", ""))


def _constant_weight(expr: relax.Expr, ndim: int, dtype=np.int8) -> np.ndarray | None:
    """``expr``'s value when it is a constant of ``ndim`` dimensions and ``dtype``, else ``None``."""
    if not isinstance(expr, Constant):
        return None
    value = expr.value.numpy()
    return value if value.dtype == dtype and value.ndim == ndim else None


def _integer_layer(call: relax.Expr) -> bool:
    return (
        isinstance(call, relax.Call)
        and isinstance(call.op, tvm.ir.Op)
        and call.op.name in (_CONV, _MATMUL)
        and _dtype(call) == "int32"
        and _dtype(call.args[0]) == "uint8"
    )


def _nchw(call: relax.Call) -> bool:
    a = call.attrs
    return (str(a.data_layout), str(a.kernel_layout), str(a.out_layout or a.data_layout)) == (
        "NCHW",
        "OIHW",
        "NCHW",
    )


def _eligible(call: relax.Expr, isa: DotProductISA | None) -> np.ndarray | None:
    """The int8 weight of an integer conv2d/matmul that has a dot-product kernel on ``isa``."""
    if isa is None or not _integer_layer(call):
        return None
    if call.op.name == _CONV:
        if int(call.attrs.groups) != 1 or not _nchw(call):
            return None
        return _constant_weight(call.args[1], 4)
    if len(call.args[0].ty.shape) < 1:
        return None
    return _constant_weight(call.args[1], 2)


def _float_pointwise(call: relax.Expr, isa: DotProductISA | None) -> np.ndarray | None:
    """The float32 weight of a float 1×1 stride-1 unpadded conv (``groups == 1``) whose output pixels
    ``isa``'s lanes do not divide, else ``None``."""
    if isa is None or not (isinstance(call, relax.Call) and isinstance(call.op, tvm.ir.Op)):
        return None
    if call.op.name != _CONV or not _nchw(call) or int(call.attrs.groups) != 1:
        return None
    if not _dtype(call) == _dtype(call.args[0]) == "float32":
        return None
    a = call.attrs
    if any(int(p) for p in a.padding) or any(int(v) != 1 for v in (*a.strides, *a.dilation)):
        return None
    weight = _constant_weight(call.args[1], 4, np.float32)
    if weight is None or weight.shape[2:] != (1, 1):
        return None
    _n, _c, height, width = (int(d) for d in call.ty.shape)
    return weight if (height * width) % isa.lanes else None


def _depthwise(call: relax.Expr) -> np.ndarray | None:
    """The constant [C, 1, KH, KW] weight of a depthwise conv2d (one output per input channel): int8 for
    an integer layer, float32 for a float one; ``None`` for anything else."""
    if not (isinstance(call, relax.Call) and isinstance(call.op, tvm.ir.Op) and call.op.name == _CONV):
        return None
    if not _nchw(call):
        return None
    if _integer_layer(call):
        weight = _constant_weight(call.args[1], 4)
        if weight is not None and weight.shape[2] * weight.shape[3] > MAX_EXACT_TAPS:
            return None
    elif _dtype(call) == _dtype(call.args[0]) == "float32":
        weight = _constant_weight(call.args[1], 4, np.float32)
    else:
        return None
    channels = int(call.args[0].ty.shape[1])
    if weight is None or int(call.attrs.groups) != channels or weight.shape[:2] != (channels, 1):
        return None
    return weight


def _spatial_pad(call: relax.Expr) -> tuple[relax.Expr, tuple[int, int, int, int], int] | None:
    """``(input, (top, left, bottom, right), value)`` of a constant NCHW pad on H/W only, else ``None``."""
    if not (isinstance(call, relax.Call) and call.op == tvm.ir.Op.get("relax.nn.pad")):
        return None
    a = call.attrs
    widths = [int(w) for w in a.pad_width]
    value = float(a.pad_value)
    if str(a.pad_mode) != "constant" or len(widths) != 8 or any(widths[:4]) or value != int(value):
        return None
    if _dtype(call) != "uint8" or not 0 <= value <= 255:
        return None
    top, bottom, left, right = widths[4:]
    return call.args[0], (top, left, bottom, right), int(value)


def _channel_vector(expr: relax.Expr, channels: int, axis_from_end: int, dtype=np.int32) -> np.ndarray | None:
    """A constant ``dtype`` vector over the output channels broadcast along ``axis_from_end``."""
    if not isinstance(expr, Constant):
        return None
    value = expr.value.numpy()
    if value.dtype != dtype or value.size != channels:
        return None
    if value.ndim and value.shape[value.ndim - axis_from_end] != channels and channels != 1:
        return None
    return value.reshape(channels)


@mutator
class _KernelRewriter(PyExprMutator):
    def __init__(
        self, mod: tvm.IRModule, isas: list[DotProductISA], float_isa: DotProductISA | None = None
    ) -> None:
        super().__init__(mod)
        self.isa = isas[0] if isas else None
        self.isas = isas
        self.float_isa = float_isa
        self.pads: dict[relax.Var, tuple[relax.Expr, tuple[int, int, int, int], int]] = {}
        self.uses: dict[relax.Var, int] = defaultdict(int)
        self.bias_of: dict[relax.Var, np.ndarray] = {}  # layer var -> the add's vector folded into it
        self.folded: dict[relax.Var, relax.Var] = {}  # add var -> layer var
        # layer var -> ("dot" | "depthwise", its int8 weight): classified once, in plan()
        self.layers: dict[relax.Var, tuple[str, np.ndarray]] = {}

    def _classify(self, call: relax.Expr) -> tuple[str, np.ndarray] | None:
        weight = _eligible(call, self.isa)
        if weight is not None:
            return "dot", weight
        weight = _depthwise(call)
        if weight is not None:
            return "depthwise", weight
        weight = _float_pointwise(call, self.float_isa)
        return ("float", weight) if weight is not None else None

    def plan(self, func: relax.Function) -> None:
        """Find each eligible layer whose only reader adds a constant channel vector: fold that add."""
        bindings = [b for block in func.body.blocks for b in block.bindings]
        for binding in bindings:
            for var in relax.analysis.free_vars(binding.value):
                self.uses[var] += 1
        for var in relax.analysis.free_vars(func.body.body):
            self.uses[var] += 1
        for binding in bindings:
            found = self._classify(binding.value)
            if found is not None:
                self.layers[binding.var] = found
        layers = {b.var: b.value for b in bindings if b.var in self.layers}
        pads = {b.var: _spatial_pad(b.value) for b in bindings}
        for value in layers.values():
            data = value.args[0]
            if value.op.name == _CONV and pads.get(data) is not None and self.uses[data] == 1:
                self.pads[data] = pads[data]
        for binding in bindings:
            value = binding.value
            if not (isinstance(value, relax.Call) and value.op == tvm.ir.Op.get("relax.add")):
                continue
            lhs, rhs = value.args
            layer = lhs if lhs in layers else rhs if rhs in layers else None
            if layer is None or self.uses[layer] != 1 or self.layers[layer][0] == "depthwise":
                continue
            conv = layers[layer].op.name == _CONV
            channels = int(layers[layer].ty.shape[1 if conv else -1])
            dtype = np.float32 if self.layers[layer][0] == "float" else np.int32
            vector = _channel_vector(rhs if layer is lhs else lhs, channels, 3 if conv else 1, dtype)
            if vector is not None and _dtype(value) == np.dtype(dtype).name:
                self.bias_of[layer] = vector
                self.folded[binding.var] = layer

    def _conv_input(self, call: relax.Call) -> tuple[relax.Expr, tuple[int, ...], int]:
        """The conv's data with a folded pad: (data, padding top/left/bottom/right, pad value)."""
        padding = tuple(int(p) for p in call.attrs.padding)
        folded = self.pads.get(call.args[0])
        if folded is None:
            return self.visit_expr(call.args[0]), padding, 0
        data, extra, value = folded
        if any(padding) and value != 0:  # two pads with different values cannot be merged
            return self.visit_expr(call.args[0]), padding, 0
        return self.visit_expr(data), tuple(p + e for p, e in zip(padding, extra, strict=True)), value

    def _depthwise_kernel(self, call: relax.Call, weight: np.ndarray) -> relax.Expr:
        data, padding, pad_value = self._conv_input(call)
        precision = "int8" if weight.dtype == np.int8 else "fp32"
        return self._fusable(
            self.builder_.call_te(
                depthwise_conv2d_planes,
                data,
                relax.const(weight.astype(np.float32)),
                strides=tuple(int(s) for s in call.attrs.strides),
                padding=padding,
                dilation=tuple(int(d) for d in call.attrs.dilation),
                pad_value=pad_value,
                primfunc_name_hint=f"depthwise_conv2d_{precision}",
            )
        )

    def _float_kernel(self, call: relax.Call, weight: np.ndarray, bias: np.ndarray | None) -> relax.Expr:
        isa = self.float_isa
        packed, _correction = pack_conv2d_weight(weight, isa)
        channels = weight.shape[0]
        total = np.zeros(channels, np.float32) if bias is None else bias.astype(np.float32)
        a = call.attrs
        return self._fusable(
            self.builder_.call_te(
                conv2d_dot,
                self.visit_expr(call.args[0]),
                relax.const(packed),
                relax.const(total),
                isa_name=isa.name,
                out_channels=channels,
                kernel=tuple(int(k) for k in weight.shape[2:]),
                strides=tuple(int(v) for v in a.strides),
                padding=tuple(int(v) for v in a.padding),
                dilation=tuple(int(v) for v in a.dilation),
                pad_value=0,
                primfunc_name_hint=f"conv2d_fp32_{isa.name}",
            )
        )

    def _dot_kernel(self, call: relax.Call, weight: np.ndarray, bias: np.ndarray | None) -> relax.Expr:
        def bias_vector(correction: np.ndarray, channels: int) -> relax.Constant:
            total = correction + (bias.astype(np.int64) if bias is not None else 0)
            return relax.const(np.broadcast_to(total, (channels,)).astype(np.int32))

        if call.op.name == _MATMUL:
            packed, correction = pack_dense_weight(weight, self.isa)
            return self._fusable(
                self.builder_.call_te(
                    dense_dot,
                    self.visit_expr(call.args[0]),
                    relax.const(packed),
                    bias_vector(correction, weight.shape[1]),
                    isa_name=self.isa.name,
                    columns=int(weight.shape[1]),
                    primfunc_name_hint=f"dense_int8_{self.isa.name}",
                )
            )
        a = call.attrs
        strides = tuple(int(s) for s in a.strides)
        data, padding, pad_value = self._conv_input(call)
        geometry = {
            "kernel": tuple(int(k) for k in weight.shape[2:]),
            "strides": strides,
            "padding": padding,
            "dilation": tuple(int(d) for d in a.dilation),
            "pad_value": pad_value,
        }
        isa = pixel_lanes(int(call.ty.shape[3]), strides, self.isas)
        if isa is not None:  # lanes over output pixels
            kernel, packing, name = conv2d_dot_pixels, pack_conv2d_weight_pixels, f"{isa.name}_pixels"
        else:  # lanes over output channels
            isa, kernel, packing, name = self.isa, conv2d_dot, pack_conv2d_weight, self.isa.name
            geometry["out_channels"] = int(weight.shape[0])
        packed, correction = packing(weight, isa)
        return self._fusable(
            self.builder_.call_te(
                kernel,
                data,
                relax.const(packed),
                bias_vector(correction, weight.shape[0]),
                isa_name=isa.name,
                **geometry,
                primfunc_name_hint=f"conv2d_int8_{name}",
            )
        )

    def _fusable(self, call: relax.Call) -> relax.Call:
        """Mark the kernel like conv2d (``kOutEWiseFusable``): FuseOps then fuses the requantize or
        dequantize that follows into it, and the kernel's schedule computes it per register tile."""
        gv = call.args[0]
        func = self.builder_.get()[gv]
        self.builder_.update_func(gv, func.with_attr("op_pattern", _OUT_ELEMWISE_FUSABLE))
        return call

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        if binding.var in self.folded:  # the add now happens inside the kernel
            layer = self.visit_expr(self.folded[binding.var])
            self.builder_.emit_normalized(relax.VarBinding(binding.var, layer))
            return
        if binding.var not in self.layers:
            super().visit_var_binding_(binding)
            return
        kind, weight = self.layers[binding.var]
        if kind == "depthwise":
            kernel = self._depthwise_kernel(binding.value, weight)
        elif kind == "float":
            kernel = self._float_kernel(binding.value, weight, self.bias_of.get(binding.var))
        else:
            kernel = self._dot_kernel(binding.value, weight, self.bias_of.get(binding.var))
        self.builder_.emit_normalized(relax.VarBinding(binding.var, self.builder_.normalize(kernel)))


@tvm.transform.module_pass(opt_level=0, name="UseCPUKernels")
class UseCPUKernels:
    """Rewrite ``main``'s layers to ohq-tvm's kernels for ``target`` (module docstring).

    On a target without a dot-product instruction only depthwise convs are rewritten; a non-CPU target
    is left unchanged. ``isas``: the dot-product instruction families used, widest first.
    """

    def __init__(self, target: Target | dict) -> None:
        self.target = target if isinstance(target, Target) else Target(target)
        self.isas = usable_isas(self.target)
        self.float_isa = float_isa(self.target)

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        if self.target.kind.name != "llvm" or "main" not in [gv.name_hint for gv in mod.get_global_vars()]:
            return mod
        flat = relax.transform.ToNonDataflow()(mod)
        rewriter = _KernelRewriter(flat, self.isas, self.float_isa)
        rewriter.plan(flat["main"])
        if not rewriter.layers:
            return mod
        func = rewriter.visit_expr(flat["main"])
        result = rewriter.builder_.get()
        result["main"] = func
        result = relax.transform.CanonicalizeBindings()(result)
        result = relax.transform.ConvertToDataflow()(result)
        return relax.transform.DeadCodeElimination(["main"])(result)


__all__ = ["UseCPUKernels"]
