"""Integer kernel cases shared by the host tests (test_kernels) and the emulated-board tests (test_emulated):
random operands, the kernels' PrimFuncs, and exact references."""

from __future__ import annotations

import numpy as np
from tvm import te

from ohq_tvm.kernels import (
    conv2d_dot,
    conv2d_dot_pixels,
    dense_dot,
    pack_conv2d_weight,
    pack_conv2d_weight_pixels,
    pack_dense_weight,
)

from testing_support import conv2d_int_reference


def conv_func(isa, shape, out_c, kernel, stride, pad, dilation, pad_value, pixels=False):
    data = te.placeholder(shape, "uint8", "data")
    group = isa.group
    blocks_in = -(-shape[1] // group)
    if pixels:
        packed_shape = (out_c, blocks_in, kernel, kernel, group)
    else:
        packed_shape = (-(-out_c // isa.lanes), blocks_in, kernel, kernel, isa.lanes, group)
    packed = te.placeholder(packed_shape, isa.weight_dtype, "packed")
    bias = te.placeholder((out_c,), "int32", "bias")
    geometry = {
        "kernel": (kernel, kernel),
        "strides": (stride, stride),
        "padding": (pad,) * 4,
        "dilation": (dilation, dilation),
        "pad_value": pad_value,
    }
    if pixels:
        out = conv2d_dot_pixels(data, packed, bias, isa_name=isa.name, **geometry)
    else:
        out = conv2d_dot(data, packed, bias, isa_name=isa.name, out_channels=out_c, **geometry)
    return te.create_prim_func([data, packed, bias, out])


def conv_case(isa, shape, out_c, kernel, stride, pad, dilation, pad_value, pixels=False, seed=0):
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, shape, dtype=np.uint8)
    weight = rng.integers(-128, 128, (out_c, shape[1], kernel, kernel), dtype=np.int8)
    bias = rng.integers(-5000, 5000, out_c).astype(np.int32)
    packed, correction = (pack_conv2d_weight_pixels if pixels else pack_conv2d_weight)(weight, isa)
    # The reference dilates the kernel explicitly.
    dilated = np.zeros((out_c, shape[1], (kernel - 1) * dilation + 1, (kernel - 1) * dilation + 1), np.int64)
    dilated[:, :, ::dilation, ::dilation] = weight
    expected = conv2d_int_reference(data, dilated, (stride, stride), (pad,) * 4, pad_value=pad_value)
    expected += bias[None, :, None, None]
    return data, packed, (bias + correction).astype(np.int32), expected


CONV_CASES = [
    # shape, out_c, kernel, stride, pad, dilation, pad_value
    ((1, 64, 14, 14), 64, 3, 1, 1, 1, 7),
    ((1, 3, 17, 17), 32, 3, 2, 1, 1, 0),  # the stem: 3 input channels, odd size
    ((1, 24, 12, 12), 144, 1, 1, 0, 1, 0),  # 1x1
    ((2, 19, 9, 9), 21, 3, 2, 1, 1, 200),  # batch 2, channels not multiples of 4 or 16
    ((1, 8, 11, 11), 16, 3, 1, 2, 2, 3),  # dilation 2
]


PIXEL_CASES = [
    # shape, out_c, kernel, stride, pad, dilation, pad_value: stride 1, output rows a multiple of 16
    ((1, 16, 6, 32), 24, 1, 1, 0, 1, 0),  # 1x1, output channels not a multiple of the lanes
    ((1, 19, 10, 16), 21, 3, 1, 1, 1, 200),  # 3x3, input channels not a multiple of 4, padded
    ((2, 8, 9, 32), 16, 3, 1, 2, 2, 3),  # batch 2, dilation 2
]


DENSE_CASES = [((1, 1280), 1000), ((3, 7), 5), ((2, 3, 8), 20)]


def depthwise_reference(data, weight, strides, padding, dilation, pad_value):
    """NCHW depthwise conv in float64 (exact for the integer cases); ``padding`` top, left, bottom, right."""
    top, left, bottom, right = padding
    padded = np.pad(
        data.astype(np.float64), ((0, 0), (0, 0), (top, bottom), (left, right)), constant_values=pad_value
    )
    _n, _c, height, width = padded.shape
    kh, kw = weight.shape[2:]
    out_h = (height - (kh - 1) * dilation[0] - 1) // strides[0] + 1
    out_w = (width - (kw - 1) * dilation[1] - 1) // strides[1] + 1
    out = 0.0
    for i in range(kh):
        for j in range(kw):
            y, x = i * dilation[0], j * dilation[1]
            patch = padded[
                :, :, y : y + strides[0] * out_h : strides[0], x : x + strides[1] * out_w : strides[1]
            ]
            out = out + patch * weight[None, :, 0, i, j, None, None].astype(np.float64)
    return out


DEPTHWISE_CASES = [
    # shape, kernel, strides, padding (top, left, bottom, right), dilation, pad value
    ((1, 16, 14, 14), 3, (1, 1), (1, 1, 1, 1), (1, 1), 0),
    ((1, 8, 15, 15), 5, (2, 2), (2, 2, 2, 2), (1, 1), 77),
    ((2, 4, 9, 9), 3, (2, 2), (1, 1, 1, 1), (1, 1), 255),
    ((1, 6, 13, 20), 3, (2, 1), (0, 0, 1, 1), (1, 1), 3),  # TF "SAME": padding only at the end
    ((1, 5, 12, 17), 3, (1, 3), (1, 2, 1, 0), (1, 1), 9),  # three column phases, odd widths
    ((1, 4, 16, 16), 3, (1, 2), (2, 2, 2, 2), (2, 2), 0),  # dilation 2
]


def dense_case(isa, shape, columns, seed=1):
    """A dense layer's kernel for ``isa`` with random operands: ``(func, [data, packed, bias], expected)``."""
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, shape, dtype=np.uint8)
    weight = rng.integers(-128, 128, (shape[-1], columns), dtype=np.int8)
    bias = rng.integers(-5000, 5000, columns).astype(np.int32)
    packed, correction = pack_dense_weight(weight, isa)
    x = te.placeholder(shape, "uint8", "x")
    w = te.placeholder(packed.shape, isa.weight_dtype, "w")
    b = te.placeholder((columns,), "int32", "b")
    func = te.create_prim_func([x, w, b, dense_dot(x, w, b, isa_name=isa.name, columns=columns)])
    expected = data.astype(np.int64) @ weight.astype(np.int64) + bias
    return func, [data, packed, (bias + correction).astype(np.int32)], expected
