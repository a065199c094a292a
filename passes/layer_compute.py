"""The Relax a layer becomes in each precision, emitted into a ``BlockBuilder``.

Shared by the rewrite (:mod:`.apply_plan`, which emits it inside the model) and by on-board measurement
(:mod:`ohq_tvm.oqa.workloads`, which emits it alone in a one-layer module), so that what is timed on the
board is exactly what a plan later runs. See :mod:`ohq_tvm.qparams` for the arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tvm import relax, te

from ohq_tvm.precision import Precision
from ohq_tvm.qparams import (
    ACTIVATION_DTYPE,
    ACTIVATION_QMAX,
    ACTIVATION_QMIN,
    ActivationQParams,
    bias_safe_scales,
    pack_int4,
    quantize_weight,
)


@dataclass(frozen=True)
class LayerSpec:
    """What a layer computes: conv2d (NCHW/OIHW) or dense ``x @ W`` (``W`` is [K, N]), with its weight."""

    weight: np.ndarray
    conv: bool
    strides: tuple[int, ...] = (1, 1)
    padding: tuple[int, ...] = (0, 0, 0, 0)
    dilation: tuple[int, ...] = (1, 1)
    groups: int = 1

    @property
    def channel_axis_of_weight(self) -> int:
        return 0 if self.conv else 1

    @property
    def channels(self) -> int:
        return int(self.weight.shape[self.channel_axis_of_weight])

    @classmethod
    def from_call(cls, call: relax.Call, weight: np.ndarray) -> LayerSpec:
        if call.op.name != "relax.nn.conv2d":
            return cls(weight, conv=False)
        a = call.attrs
        return cls(
            weight,
            conv=True,
            strides=tuple(int(s) for s in a.strides),
            padding=tuple(int(p) for p in a.padding),
            dilation=tuple(int(d) for d in a.dilation),
            groups=int(a.groups),
        )

    def float_compute(self, data: relax.Expr, dtype: str) -> relax.Expr:
        """The conv/matmul in ``dtype`` (float32 or float16) over ``data`` of that dtype."""
        weight = relax.const(self.weight.astype(dtype))
        if self.conv:
            return relax.op.nn.conv2d(
                data, weight, self.strides, self.padding, self.dilation, self.groups, out_dtype=dtype
            )
        return relax.op.matmul(data, weight, out_dtype=dtype)


@dataclass(frozen=True)
class Accumulator:
    """An integer layer's int32 result (bias and zero-point compensation included) and its scales."""

    var: relax.Var
    scale_out: np.ndarray  # float32 per output channel: value = accumulator * scale_out
    channel_shape: tuple[int, ...]  # broadcast shape of a per-channel vector against the output
    channel_axis: int


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


def emit_quantize(bb: relax.BlockBuilder, data: relax.Expr, qp: ActivationQParams) -> relax.Var:
    """float32 → uint8 with per-tensor ``qp``."""
    return bb.emit(
        relax.op.quantize(
            data,
            relax.const(qp.scale, "float32"),
            relax.const(qp.zero_point, "int32"),
            axis=-1,
            out_dtype=ACTIVATION_DTYPE,
        )
    )


def emit_half(bb: relax.BlockBuilder, half: relax.Expr, layer: LayerSpec, name: str = "") -> relax.Var:
    """The layer in float16 over a float16 input, cast back to float32."""
    result = bb.emit(layer.float_compute(half, "float16"), name_hint=name)
    return bb.emit(relax.op.astype(result, "float32"))


def emit_accumulator(
    bb: relax.BlockBuilder,
    data: relax.Expr,
    layer: LayerSpec,
    precision: Precision,
    qp: ActivationQParams,
    bias: np.ndarray | None,
    out_ndim: int,
    name: str = "",
) -> Accumulator:
    """uint8 ``data`` (quantized with ``qp``) × the quantized weight → int32, bias and zero point folded
    in."""
    qw = quantize_weight(
        layer.weight, precision, layer.channel_axis_of_weight, bias_safe_scales(bias, qp.scale)
    )
    channels = layer.channels
    channel_axis = 1 if layer.conv else out_ndim - 1
    channel_shape = [1] * out_ndim
    channel_shape[channel_axis] = channels
    if layer.conv:
        padding = list(layer.padding)
        if any(padding) and (qp.zero_point != 0 or precision is Precision.INT4W):
            top, left, bottom, right = padding
            data = bb.emit(
                relax.op.nn.pad(data, [0, 0, 0, 0, top, bottom, left, right], pad_value=float(qp.zero_point))
            )
            padding = [0, 0, 0, 0]
        if precision is Precision.INT8:
            compute = relax.op.nn.conv2d(
                data,
                relax.const(qw.values),
                layer.strides,
                padding,
                layer.dilation,
                layer.groups,
                out_dtype="int32",
            )
        else:
            compute = bb.call_te(
                _te_int4_conv2d,
                data,
                relax.const(pack_int4(qw.values)),
                weight_shape=tuple(layer.weight.shape),
                strides=list(layer.strides),
                dilation=list(layer.dilation),
                groups=layer.groups,
                primfunc_name_hint="conv2d_int4w",
            )
    elif precision is Precision.INT8:
        compute = relax.op.matmul(data, relax.const(qw.values), out_dtype="int32")
    else:
        compute = bb.call_te(
            _te_int4_dense,
            data,
            relax.const(pack_int4(qw.values)),
            weight_shape=tuple(layer.weight.shape),
            primfunc_name_hint="dense_int4w",
        )
    acc = bb.emit(compute, name_hint=name)
    scale_out = (np.float32(qp.scale) * qw.scales).astype(np.float32)
    offset = np.zeros(channels, np.int64)
    if qp.zero_point:
        offset -= qp.zero_point * qw.channel_sums()
    if bias is not None:
        offset += np.rint(bias / scale_out).astype(np.int64)
    if np.any(offset):
        acc = bb.emit(relax.op.add(acc, relax.const(offset.astype(np.int32).reshape(channel_shape))))
    return Accumulator(acc, scale_out, tuple(channel_shape), channel_axis)


def emit_requantize(
    bb: relax.BlockBuilder,
    acc: Accumulator,
    qp: ActivationQParams,
    bounds: tuple[float, float] | None,
) -> relax.Var:
    """int32 accumulator → uint8 in ``qp``, with the absorbed activation as the clip bounds."""
    multiplier = (acc.scale_out / np.float32(qp.scale)).astype(np.float32).reshape(acc.channel_shape)
    low, high = float(ACTIVATION_QMIN), float(ACTIVATION_QMAX)
    if bounds is not None:
        low = max(low, qp.level(bounds[0]))
        if np.isfinite(bounds[1]):
            high = min(high, qp.level(bounds[1]))
    scaled = bb.emit(relax.op.multiply(relax.op.astype(acc.var, "float32"), relax.const(multiplier)))
    shifted = relax.op.round(scaled)
    if qp.zero_point:
        shifted = relax.op.add(shifted, relax.const(float(qp.zero_point), "float32"))
    return bb.emit(relax.op.astype(relax.op.clip(shifted, low, high), ACTIVATION_DTYPE))


def emit_dequantize(
    bb: relax.BlockBuilder, acc: Accumulator, bounds: tuple[float, float] | None
) -> relax.Var:
    """int32 accumulator → float32, then the absorbed activation."""
    result = bb.emit(
        relax.op.dequantize(
            acc.var,
            relax.const(acc.scale_out),
            relax.const(0, "int32"),
            axis=acc.channel_axis,
            out_dtype="float32",
        )
    )
    if bounds is not None:
        low, high = bounds
        result = bb.emit(relax.op.nn.relu(result) if np.isinf(high) else relax.op.clip(result, low, high))
    return result


__all__ = [
    "Accumulator",
    "LayerSpec",
    "emit_accumulator",
    "emit_dequantize",
    "emit_half",
    "emit_quantize",
    "emit_requantize",
]
