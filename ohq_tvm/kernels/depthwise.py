"""Depthwise conv2d over padded float planes: float32 layers, and int8 layers computed exactly in float32.

A depthwise conv has no dot-product form (each output reads one input channel), so the integer
instructions of :mod:`.isa` do not apply, and 32-bit integer multiplies are several times slower than
float FMAs on x86 and as slow on NEON. Every product of a uint8 activation and an int8 weight is an
integer below 2^15 in magnitude, and a sum of ``KH·KW`` of them stays below 2^24 (exactly representable
in float32) for any kernel up to 22×22; so the int8 conv computed in float32 and cast back is the same
int32 result, bit for bit, at the float kernel's speed with a quarter of its input traffic.

Both precisions share one layout. The first stage builds each channel's padded plane in float32 (the
uint8 input converted once there, not at each of the ``KH·KW`` taps); with a column stride ``s`` the
plane is stored as ``s`` phases, ``plane[y, p, j] = padded[y, j·s + p]``, so the taps of a strided conv
read contiguous vectors instead of gathering every other element. The stage carries the rows and
columns where it is a plain copy of the input (:data:`INTERIOR`), which the schedule
(:mod:`ohq_tvm.codegen.conv_schedule`) uses to vectorise the copy and test the padding only at the border.
The int8 result is int32 NCHW and the float one float32 NCHW, so the epilogue that follows (bias,
activation, requantize or dequantize) fuses into the kernel unchanged.
"""

from __future__ import annotations

from tvm import te, tirx

MAX_EXACT_TAPS = (1 << 24) // (255 * 128)  # 514: beyond this a float32 sum could round

PAD_BLOCK = "ohq_depthwise_pad"
CONV_BLOCK = "ohq_depthwise_conv2d"
INTERIOR = "ohq_interior"  # pad block annotation: rows [a, b) and plane columns [c, d) copying the input


def depthwise_conv2d_planes(
    data: te.Tensor,
    weight: te.Tensor,
    *,
    strides: tuple[int, int],
    padding: tuple[int, int, int, int],
    dilation: tuple[int, int],
    pad_value: float = 0,
) -> te.Tensor:
    """NCHW ``data`` ⊛ float32 ``weight`` [C, 1, KH, KW], ``padding`` as (top, left, bottom, right).

    float32 ``data`` gives the float32 conv; uint8 ``data`` with int8-valued weights the exact int32 one
    (raises ``ValueError`` for a window too large to stay exact)."""
    n, channels, height, width = (int(d) for d in data.shape)
    _, _, kh, kw = (int(d) for d in weight.shape)
    integer = str(data.dtype) == "uint8"
    if integer and kh * kw > MAX_EXACT_TAPS:
        raise ValueError(f"a {kh}x{kw} depthwise kernel could round in float32")
    top, left, bottom, right = padding
    padded_h, padded_w = height + top + bottom, width + left + right
    out_h = (padded_h - (kh - 1) * dilation[0] - 1) // strides[0] + 1
    out_w = (padded_w - (kw - 1) * dilation[1] - 1) // strides[1] + 1
    phases = strides[1]
    columns = (padded_w + phases - 1) // phases
    fill = tirx.const(pad_value, str(data.dtype))

    def pad(b, c, y, phase, j):
        x = j * phases + phase
        inside = tirx.all(y >= top, y < height + top, x >= left, x < width + left)
        return tirx.if_then_else(inside, data[b, c, y - top, x - left], fill).astype("float32")

    # Plane columns j whose every phase x = j·s + p lies inside the input (x - left in [0, width)).
    first = -(-left // phases)
    last = min((left + width - phases) // phases + 1, columns)
    padded = te.compute(
        (n, channels, padded_h, phases, columns),
        pad,
        name=PAD_BLOCK,
        attrs={INTERIOR: [top, top + height, first, last]} if first < last else {},
    )
    rh = te.reduce_axis((0, kh), "rh")
    rw = te.reduce_axis((0, kw), "rw")

    def tap(b, c, y, x):
        column = (
            rw * dilation[1]
        )  # padded column x·s + column: phase column % s, plane column x + column // s
        row = y * strides[0] + rh * dilation[0]
        return padded[b, c, row, tirx.floormod(column, phases), x + tirx.floordiv(column, phases)]

    acc = te.compute(
        (n, channels, out_h, out_w),
        lambda b, c, y, x: te.sum(tap(b, c, y, x) * weight[c, 0, rh, rw], axis=[rh, rw]),
        name=CONV_BLOCK,
    )
    if not integer:
        return acc
    return te.compute(acc.shape, lambda *idx: acc[idx].astype("int32"), name="ohq_depthwise_int32")
