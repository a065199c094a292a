"""int8 conv2d and dense kernels in the layouts the dot-product instructions want (TE compute + packing).

Both compute ``uint8 activations × int8 weights → int32`` exactly (no saturation), plus a per-output-channel
int32 ``bias`` (the caller folds zero-point compensation and the layer's bias into it).

- **conv2d** (NCHW in, NCHW out, ``groups == 1``): the kernel's first stage copies the input into
  ``[N, C/4, H+pad, W+pad, 4]`` (padding with ``pad_value``: the activation zero point, and channels
  rounded up to 4 with zeros), so the 4 input channels one instruction reduces over are adjacent bytes.
  The weight is packed offline (:func:`pack_conv2d_weight`) to ``[O/L, C/4, KH, KW, L, 4]``: the ``L × 4``
  block an instruction multiplies is contiguous (``L`` = the instruction's lanes). The accumulator is
  ``[N, O/L, OH, OW, L]``; the last stage writes NCHW and adds ``bias``.
- **conv2d, pixel form** (:func:`conv2d_dot_pixels`, stride-1 rows that ``L`` divides): the same packed
  input, the weight packed to ``[O, C/4, KH, KW, 4]``; lanes run over ``L`` adjacent output pixels
  (64 contiguous bytes of the packed input per instruction, the 4 weights broadcast), so the
  accumulator ``[N, O, OH, OW/L, L]`` holds NCHW rows and the output stage stores vectors as they are
  (the channel form transposes there, and pads ``O`` to a multiple of ``L``).
- **dense** (``x[..., K] @ W[K, N]``): rows of ``x`` are already contiguous along ``K``; only ``K`` not a
  multiple of 4 needs a zero-padded copy. The weight is packed to ``[N/L, K/4, L, 4]``.

For ``sdot`` (signed × signed) the first stage also shifts activations to int8 (``x - 128``); the packing
functions return the matching ``128 · Σw`` correction for the caller to add to ``bias``. For ``avx2``
(``vpmaddwd``) the groups are 2 wide instead of 4 and hold int16: the first stage widens the activations,
the weights are packed as int16 (every "4" above reads "2" there).

The fp32 forms (``fma_*`` in :mod:`.isa`) are the channel form of conv2d in float32 throughout (``group``
1: activations copied as they are, weights packed to ``[O/L, C, KH, KW, L, 1]``, float accumulators and
bias), for float 1×1 convs over maps that no vector width divides (14×14, 7×7), where lanes along the
pixels would be short.

Blocks carry a ``schedule_rule`` annotation naming the rule in :mod:`.schedule` that schedules them, so
MetaSchedule tunes them with that rule and the zero-budget schedule uses the same rule with default tiles.
"""

from __future__ import annotations

import numpy as np
from tvm import te, tirx

from .isa import ISAS, DotProductISA

PACK_BLOCK = "ohq_dot_pack"
CONV_BLOCK = "ohq_dot_conv2d"
PIXEL_CONV_BLOCK = "ohq_dot_conv2d_pixels"
DENSE_BLOCK = "ohq_dot_dense"
OUTPUT_BLOCK = "ohq_dot_output"
DOT_RULE = "ohq_dot"  # the custom MetaSchedule rule (see .schedule)
ISA_ATTR = "ohq_dot_isa"


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _weight_source(isa: DotProductISA) -> str:
    """The weight type a layer comes with: int8, or float32 for the fp32 multiply-add forms."""
    return "float32" if isa.weight_dtype == "float32" else "int8"


def pack_conv2d_weight(weight: np.ndarray, isa: DotProductISA) -> tuple[np.ndarray, np.ndarray]:
    """OIHW int8 (float32 for an fp32 form) → ``[O/L, C/G, KH, KW, L, G]`` (zero-padded, in the ISA's
    weight type), and the per-channel bias correction."""
    if weight.dtype != np.dtype(_weight_source(isa)) or weight.ndim != 4:
        raise ValueError(f"expected an OIHW {_weight_source(isa)} weight, got {weight.dtype} {weight.shape}")
    out_c, in_c, kh, kw = weight.shape
    lanes, group = isa.lanes, isa.group
    padded = np.zeros((_round_up(out_c, lanes), _round_up(in_c, group), kh, kw), isa.weight_dtype)
    padded[:out_c, :in_c] = weight
    packed = padded.reshape(padded.shape[0] // lanes, lanes, padded.shape[1] // group, group, kh, kw)
    packed = np.ascontiguousarray(packed.transpose(0, 2, 4, 5, 1, 3))
    correction = isa.activation_offset * weight.reshape(out_c, -1).astype(np.int64).sum(axis=1)
    return packed, correction


def pack_conv2d_weight_pixels(weight: np.ndarray, isa: DotProductISA) -> tuple[np.ndarray, np.ndarray]:
    """OIHW int8 → ``[O, C/G, KH, KW, G]`` (channels zero-padded) for :func:`conv2d_dot_pixels`, and the
    per-channel bias correction."""
    if weight.dtype != np.int8 or weight.ndim != 4:
        raise ValueError(f"expected an OIHW int8 weight, got {weight.dtype} {weight.shape}")
    out_c, in_c, kh, kw = weight.shape
    group = isa.group
    padded = np.zeros((out_c, _round_up(in_c, group), kh, kw), isa.weight_dtype)
    padded[:, :in_c] = weight
    packed = np.ascontiguousarray(padded.reshape(out_c, -1, group, kh, kw).transpose(0, 1, 3, 4, 2))
    correction = isa.activation_offset * weight.reshape(out_c, -1).astype(np.int64).sum(axis=1)
    return packed, correction


def pixel_lanes(out_width: int, strides: tuple[int, int], isas: list[DotProductISA]) -> DotProductISA | None:
    """The widest of ``isas`` whose lanes divide the output rows of a stride-1 conv (the pixel form of
    :func:`conv2d_dot_pixels` reads ``lanes`` adjacent input columns as one vector), else ``None``."""
    if strides[1] != 1:
        return None
    return next((isa for isa in isas if out_width % isa.lanes == 0), None)


def pack_dense_weight(weight: np.ndarray, isa: DotProductISA) -> tuple[np.ndarray, np.ndarray]:
    """``[K, N]`` int8 → ``[N/L, K/G, L, G]`` (zero-padded), and the per-column bias correction."""
    if weight.dtype != np.int8 or weight.ndim != 2:
        raise ValueError(f"expected a [K, N] int8 weight, got {weight.dtype} {weight.shape}")
    reduction, columns = weight.shape
    lanes, group = isa.lanes, isa.group
    padded = np.zeros((_round_up(columns, lanes), _round_up(reduction, group)), isa.weight_dtype)
    padded[:columns, :reduction] = weight.T
    packed = padded.reshape(padded.shape[0] // lanes, lanes, padded.shape[1] // group, group)
    packed = np.ascontiguousarray(packed.transpose(0, 2, 1, 3))
    correction = isa.activation_offset * weight.astype(np.int64).sum(axis=0)
    return packed, correction


def _activation(value, isa: DotProductISA):
    """A uint8 activation as the instruction reads it."""
    if isa.activation_dtype in ("uint8", "float32"):  # float32: an fp32 form's activations as they are
        return value
    if isa.activation_dtype == "int16":  # widened once here, not per instruction
        return value.astype("int16")
    return (value.astype("int32") - isa.activation_offset).astype("int8")


def _attrs(isa: DotProductISA) -> dict:
    return {"schedule_rule": DOT_RULE, ISA_ATTR: isa.name}


def _output_size(data, kernel, strides, padding, dilation) -> tuple[int, int]:
    """Output rows and columns of a conv over NCHW ``data`` (``padding``: top, left, bottom, right)."""
    _n, _c, height, width = (int(d) for d in data.shape)
    top, left, bottom, right = padding
    out_h = (height + top + bottom - (kernel[0] - 1) * dilation[0] - 1) // strides[0] + 1
    out_w = (width + left + right - (kernel[1] - 1) * dilation[1] - 1) // strides[1] + 1
    return out_h, out_w


def _conv_sum(data_packed, packed, shape, *, column, weight, geometry, name, isa) -> te.Tensor:
    """The accumulator of both conv forms: ``shape`` is ``(n, channel index, y, *last)``; ``column(*last)``
    is the output column, ``weight(channel index, last, (rco, rkh, rkw, rci))`` the packed weight."""
    kernel, strides, dilation = geometry
    rco, rkh, rkw, rci = reduce = (
        te.reduce_axis((0, int(packed.shape[1])), "rco"),
        te.reduce_axis((0, kernel[0]), "rkh"),
        te.reduce_axis((0, kernel[1]), "rkw"),
        te.reduce_axis((0, isa.group), "rci"),
    )

    def accumulate(b, o, y, *last):
        row = y * strides[0] + rkh * dilation[0]
        value = data_packed[b, rco, row, column(*last) * strides[1] + rkw * dilation[1], rci]
        acc = isa.accumulator_dtype
        return te.sum(value.astype(acc) * weight(o, last, reduce).astype(acc), axis=list(reduce))

    return te.compute(shape, accumulate, name=name, attrs=_attrs(isa))


def _conv_output(accumulated, shape, bias, isa) -> te.Tensor:
    """The last stage of both conv forms: NCHW ``accumulated(b, o, y, x) + bias[o]``."""
    return te.compute(
        shape, lambda b, o, y, x: accumulated(b, o, y, x) + bias[o], name=OUTPUT_BLOCK, attrs=_attrs(isa)
    )


def _pack_conv_input(data, isa, padding, pad_value):
    """The first stage of both conv kernels: ``[N, C/4, H+pad, W+pad, 4]`` (see the module docstring)."""
    n, in_c, height, width = (int(d) for d in data.shape)
    top, left, bottom, right = padding
    fill = tirx.const(pad_value, str(data.dtype))

    group = isa.group

    def pack(b, co, y, x, ci):
        c = co * group + ci
        inside = tirx.all(y >= top, y < height + top, x >= left, x < width + left, c < in_c)
        value = data[b, tirx.min(c, in_c - 1), tirx.max(y - top, 0), tirx.max(x - left, 0)]
        return _activation(tirx.if_then_else(inside, value, fill), isa)

    shape = (n, _round_up(in_c, group) // group, height + top + bottom, width + left + right, group)
    return te.compute(shape, pack, name=PACK_BLOCK, attrs=_attrs(isa))


def conv2d_dot(
    data: te.Tensor,
    packed: te.Tensor,
    bias: te.Tensor,
    *,
    isa_name: str,
    out_channels: int,
    kernel: tuple[int, int],
    strides: tuple[int, int],
    padding: tuple[int, int, int, int],
    dilation: tuple[int, int],
    pad_value: int,
) -> te.Tensor:
    """NCHW uint8 ``data`` ⊛ ``packed`` (from :func:`pack_conv2d_weight`) + ``bias[O]`` → NCHW int32."""
    isa = ISAS[isa_name]
    n = int(data.shape[0])
    out_h, out_w = _output_size(data, kernel, strides, padding, dilation)
    lanes = isa.lanes
    data_packed = _pack_conv_input(data, isa, padding, pad_value)
    acc = _conv_sum(
        data_packed,
        packed,
        (n, int(packed.shape[0]), out_h, out_w, lanes),
        column=lambda x, _oi: x,
        weight=lambda oo, lane, r: packed[oo, r[0], r[1], r[2], lane[1], r[3]],
        geometry=(kernel, strides, dilation),
        name=CONV_BLOCK,
        isa=isa,
    )
    return _conv_output(
        lambda b, o, y, x: acc[b, o // lanes, y, x, o % lanes], (n, out_channels, out_h, out_w), bias, isa
    )


def conv2d_dot_pixels(
    data: te.Tensor,
    packed: te.Tensor,
    bias: te.Tensor,
    *,
    isa_name: str,
    kernel: tuple[int, int],
    strides: tuple[int, int],
    padding: tuple[int, int, int, int],
    dilation: tuple[int, int],
    pad_value: int,
) -> te.Tensor:
    """NCHW uint8 ``data`` ⊛ ``packed`` (from :func:`pack_conv2d_weight_pixels`) + ``bias[O]`` → NCHW int32,
    with the instruction's lanes over output pixels: the accumulator is ``[N, O, OH, OW/L, L]``, each
    instruction multiplies ``L`` adjacent pixels' 4 channels (64 contiguous bytes of the packed input) by
    4 broadcast weights, and a finished vector is ``L`` adjacent outputs of one NCHW row: the output
    stage stores it as it is, where the channel form has to transpose. Output channels are not padded to
    the lanes either. Needs a column stride of 1 and output rows that ``L`` divides (:func:`pixel_lanes`)."""
    isa = ISAS[isa_name]
    n, out_c = int(data.shape[0]), int(packed.shape[0])
    out_h, out_w = _output_size(data, kernel, strides, padding, dilation)
    lanes = isa.lanes
    if strides[1] != 1 or out_w % lanes:
        raise ValueError(f"the pixel form needs column stride 1 and rows of a multiple of {lanes}")
    data_packed = _pack_conv_input(data, isa, padding, pad_value)
    acc = _conv_sum(
        data_packed,
        packed,
        (n, out_c, out_h, out_w // lanes, lanes),
        column=lambda xo, xi: xo * lanes + xi,
        weight=lambda o, _lane, r: packed[o, r[0], r[1], r[2], r[3]],
        geometry=(kernel, strides, dilation),
        name=PIXEL_CONV_BLOCK,
        isa=isa,
    )
    return _conv_output(
        lambda b, o, y, x: acc[b, o, y, x // lanes, x % lanes], (n, out_c, out_h, out_w), bias, isa
    )


def dense_dot(
    data: te.Tensor, packed: te.Tensor, bias: te.Tensor, *, isa_name: str, columns: int
) -> te.Tensor:
    """uint8 ``data[..., K]`` @ ``packed`` (from :func:`pack_dense_weight`) + ``bias[N]`` → int32 [..., N]."""
    isa = ISAS[isa_name]
    *batch, reduction = (int(d) for d in data.shape)
    blocks_k = int(packed.shape[1])
    lanes, group = isa.lanes, isa.group
    if reduction % group or isa.activation_dtype != "uint8":

        def pack(*idx):
            k = idx[-2] * group + idx[-1]
            value = data[(*idx[:-2], tirx.min(k, reduction - 1))]
            return _activation(tirx.if_then_else(k < reduction, value, tirx.const(0, "uint8")), isa)

        rows = te.compute((*batch, blocks_k, group), pack, name=PACK_BLOCK, attrs=_attrs(isa))

        def row_at(idx, ko, ki):
            return rows[(*idx, ko, ki)]
    else:
        rows = data

        def row_at(idx, ko, ki):
            return rows[(*idx, ko * group + ki)]

    rko = te.reduce_axis((0, blocks_k), "rko")
    rki = te.reduce_axis((0, group), "rki")
    acc = te.compute(
        (*batch, int(packed.shape[0]), lanes),
        lambda *idx: te.sum(
            row_at(idx[:-2], rko, rki).astype("int32") * packed[idx[-2], rko, idx[-1], rki].astype("int32"),
            axis=[rko, rki],
        ),
        name=DENSE_BLOCK,
        attrs=_attrs(isa),
    )
    return te.compute(
        (*batch, columns),
        lambda *idx: acc[(*idx[:-1], idx[-1] // lanes, idx[-1] % lanes)] + bias[idx[-1]],
        name=OUTPUT_BLOCK,
        attrs=_attrs(isa),
    )
