"""int8 depthwise conv2d computed exactly in float32 arithmetic.

A depthwise conv has no dot-product form (each output reads one input channel), so the integer
instructions of :mod:`.isa` do not apply, and 32-bit integer multiplies are several times slower than
float FMAs on x86 and as slow on NEON. Every product of a uint8 activation and an int8 weight is an
integer below 2^15 in magnitude, and a sum of ``KH·KW`` of them stays below 2^24 (exactly representable
in float32) for any kernel up to 22×22; so the conv computed in float32 and cast back is the same int32
result, bit for bit, at the float kernel's speed with a quarter of its input traffic.

The first stage pads the input (with ``pad_value``, the activation zero point) and converts it to
float32, so the schedule builds each channel's padded float plane in cache once and the taps read it
like the float kernel does; the result is int32 NCHW, so the integer epilogue that follows
(bias, requantize or dequantize) is unchanged and fuses into the kernel.
"""

from __future__ import annotations

from tvm import te, tirx

MAX_EXACT_TAPS = (1 << 24) // (255 * 128)  # 514: beyond this a float32 sum could round

PAD_BLOCK = "ohq_depthwise_pad"
CONV_BLOCK = "ohq_depthwise_conv2d"


def depthwise_conv2d_exact(
    data: te.Tensor,
    weight: te.Tensor,
    *,
    strides: tuple[int, int],
    padding: tuple[int, int, int, int],
    dilation: tuple[int, int],
    pad_value: int,
) -> te.Tensor:
    """uint8 NCHW ``data`` ⊛ float32 ``weight`` [C, 1, KH, KW] (int8 values) → int32 NCHW, exactly."""
    n, channels, height, width = (int(d) for d in data.shape)
    _, _, kh, kw = (int(d) for d in weight.shape)
    if kh * kw > MAX_EXACT_TAPS:
        raise ValueError(f"a {kh}x{kw} depthwise kernel could round in float32")
    top, left, bottom, right = padding
    padded_h, padded_w = height + top + bottom, width + left + right
    out_h = (padded_h - (kh - 1) * dilation[0] - 1) // strides[0] + 1
    out_w = (padded_w - (kw - 1) * dilation[1] - 1) // strides[1] + 1
    fill = tirx.const(pad_value, "uint8")

    def pad(b, c, y, x):
        inside = tirx.all(y >= top, y < height + top, x >= left, x < width + left)
        value = data[
            b, c, tirx.max(tirx.min(y - top, height - 1), 0), tirx.max(tirx.min(x - left, width - 1), 0)
        ]
        return tirx.if_then_else(inside, value, fill)

    padded = te.compute((n, channels, padded_h, padded_w), pad, name=PAD_BLOCK)
    rh = te.reduce_axis((0, kh), "rh")
    rw = te.reduce_axis((0, kw), "rw")
    acc = te.compute(
        (n, channels, out_h, out_w),
        lambda b, c, y, x: te.sum(
            padded[b, c, y * strides[0] + rh * dilation[0], x * strides[1] + rw * dilation[1]].astype(
                "float32"
            )
            * weight[c, 0, rh, rw],
            axis=[rh, rw],
        ),
        name=CONV_BLOCK,
    )
    return te.compute(acc.shape, lambda *idx: acc[idx].astype("int32"), name="ohq_depthwise_int32")
