"""Schedules for the dot-product kernels of :mod:`.int8_dot`, default and tunable.

The accumulator block is tiled into a register tile of instruction results with the reduction loops
outside the tile and the ``L × 4`` innermost block replaced by the dot-product instruction
(``tensorize``): ``rows × cols`` for the channel form (``rows`` output pixels or matrix rows, ``cols``
blocks of ``L`` output channels), ``channels × rows × vectors`` for the pixel form (output channels,
output rows, ``L``-wide pieces of a row), a register tile (:func:`.loops.register_tile`). The output
stage (NCHW write + bias, and the requantize/dequantize fused after it) is computed per tile and stored
as vectors, so the accumulator is never materialised in memory. Outer spatial loops are fused and run in
parallel; the activation-packing stage is parallel over its outer loops.

- :func:`schedule_default` applies fixed tiles (zero tuning budget) within the ISA's ``max_tile``
  accumulators (16; 15 of AVX-512's 64 bytes; 12 on AVX2's 16 registers): the channel form's ``rows``
  (a divisor of the row extent up to 8) and ``cols`` (of the channel blocks, up to 4), the pixel form's
  ``vectors`` × ``rows`` up to 4, then as many output channels as fit (see :func:`_default_choice`).
- The MetaSchedule rule ``s_tir.meta_schedule.cpu.ohq_dot`` (registered on import) samples the same
  factors from the divisors instead, so tuning searches the tile over measured candidates.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import tvm
from tvm import s_tir, tirx

from .int8_dot import (
    CONV_BLOCK,
    DENSE_BLOCK,
    DOT_RULE,
    ISA_ATTR,
    OUTPUT_BLOCK,
    PACK_BLOCK,
    PIXEL_CONV_BLOCK,
)
from .isa import ISAS, register_intrinsics
from .loops import fold_consumers, inline_other_blocks, parallel, register_tile

_MAX_ROWS = 8
_MAX_COLS = 4
_MAX_VECTORS = 4  # the pixel form: lane-wide pieces of one output row, and output rows, in a tile
_DEFAULT_TILE = 16  # accumulators in the default register tile (x86 and AArch64 both have 32 vector regs)


def _divisors(extent: int, limit: int) -> list[int]:
    return [d for d in range(1, min(extent, limit) + 1) if extent % d == 0]


def _extent(sch: s_tir.Schedule, loop) -> int:
    return int(sch.get(loop).extent)


def _blocks(sch: s_tir.Schedule) -> dict[str, s_tir.SBlockRV]:
    found = {}
    for name in (PACK_BLOCK, CONV_BLOCK, PIXEL_CONV_BLOCK, DENSE_BLOCK, OUTPUT_BLOCK):
        try:
            found[name] = sch.get_sblock(name)
        except Exception:  # absent stage (dense without a packing copy; conv vs dense)
            continue
    return found


def has_dot_kernel(func: tirx.PrimFunc) -> bool:
    """Whether ``func`` contains a dot-product kernel block (and so needs :func:`schedule_default`)."""
    found = False

    def visit(node) -> None:
        nonlocal found
        if isinstance(node, s_tir.SBlock) and node.annotations.get("schedule_rule") == DOT_RULE:
            found = True

    _walk(func.body, visit)
    return found


def _walk(stmt, visit) -> None:
    """Pre-order walk over the statement kinds a TE-made PrimFunc has (tirx has no stmt_functor here)."""
    stack = [stmt]
    while stack:
        node = stack.pop()
        if node is None:
            continue
        visit(node)
        if isinstance(node, s_tir.SBlockRealize):
            stack.append(node.block)
        elif isinstance(node, s_tir.SBlock):
            stack.extend([node.body, node.init])
        elif isinstance(node, tirx.SeqStmt):
            stack.extend(node.seq)
        elif hasattr(node, "body"):
            stack.append(node.body)


def _tile(
    sch: s_tir.Schedule,
    compute: s_tir.SBlockRV,
    output: s_tir.SBlockRV,
    choose: Callable[..., object],
) -> None:
    """Tile, parallelise and tensorize the accumulator block; compute the output stage per tile."""
    block = sch.get(compute)
    isa = ISAS[str(block.annotations[ISA_ATTR])]
    loops = sch.get_loops(compute)
    if block.name_hint == CONV_BLOCK:  # n, oo, y, x, oi | rco, rkh, rkw, rci
        n, col, y, row, lanes, *reduce, inner = loops
        major, minor = [n], [y]
    else:  # *batch, no, ni | rko, rki
        *batch, col, lanes, reduce_k, inner = loops
        reduce = [reduce_k]
        if batch:
            major, minor, row = batch[:-1], [], batch[-1]
        else:
            major, minor, row = [], [], None
    row_extent = _extent(sch, row) if row is not None else 1
    col_candidates = _divisors(_extent(sch, col), _MAX_COLS)
    rows = choose("rows", _divisors(row_extent, _MAX_ROWS), [col_candidates])
    cols = choose("cols", col_candidates)
    col_o, col_i = sch.split(col, factors=[None, cols])
    tile = [col_i]
    outer = [*major, col_o, *minor]
    if row is not None:
        row_o, row_i = sch.split(row, factors=[None, rows])
        outer.append(row_o)
        tile.append(row_i)
    _finish_tile(sch, compute, output, (outer, reduce, tile, lanes, inner), isa, isa.intrinsic)


def _finish_tile(sch: s_tir.Schedule, compute, output, loops: tuple, isa, intrinsic: str) -> None:
    """Order ``(outer, reduce, tile, lanes, inner)`` loops, run the fused outer ones in parallel, keep the
    tile in registers with the output stage computed per tile, and tensorize the lanes with ``isa``'s
    ``intrinsic``."""
    register_intrinsics([isa])
    outer, reduce, tile, lanes, inner = loops
    sch.reorder(*outer, *reduce, *tile, lanes, inner)
    fused = parallel(sch, outer)
    sch.reverse_compute_at(output, fused, preserve_unit_loops=True)
    # The output stage per tile (unit loops kept: the trace's loop count must not depend on the sampled
    # tile, or MetaSchedule cannot replay it), its innermost loop as vectors: the pixel form's NCHW rows,
    # dense rows, or the channel form's NCHW columns (read across the accumulator's lanes).
    sch.vectorize(sch.get_loops(output)[-1])
    register_tile(sch, compute)
    init = sch.decompose_reduction(compute, reduce[0])
    sch.vectorize(sch.get_loops(init)[-1])
    for loop in tile:
        sch.unroll(loop)
    sch.tensorize(lanes, intrinsic)


def _tile_pixels(
    sch: s_tir.Schedule,
    compute: s_tir.SBlockRV,
    output: s_tir.SBlockRV,
    choose: Callable[[str, list[int]], object],
) -> None:
    """The pixel form's tile: ``channels × rows × vectors`` instruction results (output channels, output
    rows, lane-wide pieces of a row), reduction outside, the output stage per tile, stored as vectors."""
    isa = ISAS[str(sch.get(compute).annotations[ISA_ATTR])]
    n, channel, y, x_o, lanes, *reduce, inner = sch.get_loops(compute)
    vectors = choose("vectors", _divisors(_extent(sch, x_o), _MAX_VECTORS))
    rows = choose("rows", _divisors(_extent(sch, y), _MAX_VECTORS))
    out_channels = _extent(sch, channel)
    channels = choose("channels", _divisors(out_channels, _DEFAULT_TILE))
    c_o, c_i = sch.split(channel, factors=[None, channels])
    y_o, y_i = sch.split(y, factors=[None, rows])
    x_oo, x_oi = sch.split(x_o, factors=[None, vectors])
    # A pixel tile's activations (K channels, packed) against its outputs (O channels): when the
    # activations weigh more (a projection, 144 -> 24), all output channels are computed while the tile's
    # activations are in L1, instead of streaming the whole packed input once per block of channels
    # (10-20% faster on a Zen 3); when the outputs weigh more (an expansion, 16 -> 96), one block of
    # channels sweeps the pixels, writing its rows contiguously (25% faster there).
    activation_bytes = _extent(sch, reduce[0]) * isa.group * np.dtype(isa.activation_dtype).itemsize
    outer = [n, y_o, x_oo, c_o] if activation_bytes >= out_channels else [n, c_o, y_o, x_oo]
    loops = (outer, reduce, [c_i, y_i, x_oi], lanes, inner)
    _finish_tile(sch, compute, output, loops, isa, isa.pixel_intrinsic)


def _absorb_fused_ops(sch: s_tir.Schedule) -> None:
    """Fold what FuseOps put around the kernel into it: the element-wise epilogue (requantize or
    dequantize, activation, residual add) is reverse-inlined into the output stage, so it runs on each
    register tile; other producers (e.g. a residual's dequantize) are inlined into their readers. A block
    that cannot be inlined is left in place and given a parallel loop. Producers go first where a
    consumer reads one besides the output (a residual add of a dequantized skip: TVM reverse-inlines
    only a consumer whose other reads are the function's inputs), then the consumers are folded again."""
    own = {PACK_BLOCK, CONV_BLOCK, PIXEL_CONV_BLOCK, DENSE_BLOCK, OUTPUT_BLOCK}
    fold_consumers(sch, sch.get_sblock(OUTPUT_BLOCK))
    inline_other_blocks(sch, own, lambda _block: None)
    fold_consumers(sch, sch.get_sblock(OUTPUT_BLOCK))
    inline_other_blocks(sch, own, lambda block: parallel(sch, sch.get_loops(block)))


def _pack(sch: s_tir.Schedule, pack: s_tir.SBlockRV) -> None:
    loops = sch.get_loops(pack)
    parallel(sch, loops[:-2] if len(loops) > 2 else loops[:1])
    sch.unroll(loops[-1])


def _filled(following: list[list[int]], budget: int) -> int:
    """The most accumulators the ``following`` choices can add within ``budget`` (a product of one
    candidate of each)."""
    if not following:
        return 1
    return max((c * _filled(following[1:], budget // c) for c in following[0] if c <= budget), default=1)


def _default_choice(name: str, candidates: list[int], state: dict, following: list[list[int]]) -> int:
    """Fixed tiles within the ISA's ``max_tile`` accumulators: the channel form's ``rows`` then ``cols``,
    the pixel form's ``vectors``, ``rows`` (up to :data:`_MAX_VECTORS` vectors together), ``channels``;
    each the largest candidate that fits, or, for an instruction that accumulates in place, the one that
    with the ``following`` choices fills the most of the tile (AVX-512's 15: 7 rows x 2 column blocks
    rather than 8 x 1). Not for AVX2: ``vpmaddwd``'s product takes a register of its own, and a filled
    channel tile (4 x 3 rather than 8 x 1) measured 4-8% slower on a Zen 3."""
    used = state.get("used", 1)
    limit = _MAX_VECTORS if name == "rows" and "vectors" in state else state.get("tile", _DEFAULT_TILE)
    fitting = [c for c in candidates if c * used <= limit] or [1]
    chosen = fitting[-1]
    if state.get("fill"):
        chosen = max(fitting, key=lambda c: (c * _filled(following, limit // (c * used)), c))
    state[name] = chosen
    state["used"] = used * chosen
    return chosen


def schedule_default(func: tirx.PrimFunc) -> s_tir.Schedule:
    """The zero-budget schedule of a PrimFunc holding one dot-product kernel (see the module docstring)."""
    sch = s_tir.Schedule(func)
    blocks = _blocks(sch)
    compute = blocks.get(PIXEL_CONV_BLOCK) or blocks.get(CONV_BLOCK) or blocks.get(DENSE_BLOCK)
    # Up to 16 accumulators with 32 vector registers (15 of AVX-512's); with AVX2's 16 ymm, 12 (a few
    # spill, since vpmaddwd needs a temporary, but 8 or 9 without spills measured 10-25% slower on a Zen 3)
    isa = ISAS[str(sch.get(compute).annotations[ISA_ATTR])]
    state: dict = {"tile": isa.max_tile, "fill": isa.accumulates}

    def choose(name: str, candidates: list[int], following=()) -> int:
        return _default_choice(name, candidates, state, list(following))

    _absorb_fused_ops(sch)
    if PIXEL_CONV_BLOCK in blocks:
        _tile_pixels(sch, blocks[PIXEL_CONV_BLOCK], blocks[OUTPUT_BLOCK], choose)
    else:
        compute = blocks.get(CONV_BLOCK) or blocks.get(DENSE_BLOCK)
        _tile(sch, compute, blocks[OUTPUT_BLOCK], choose)
    if PACK_BLOCK in blocks:
        _pack(sch, blocks[PACK_BLOCK])
    return sch


def _tuning_rule(sch: s_tir.Schedule, block: s_tir.SBlockRV) -> list[s_tir.Schedule]:
    """MetaSchedule custom rule: called once per annotated block; the accumulator block does the work."""
    name = sch.get(block).name_hint
    if name in (CONV_BLOCK, PIXEL_CONV_BLOCK, DENSE_BLOCK):

        def sample(_name: str, candidates: list[int], _following=()):
            return sch.sample_categorical(candidates, [1.0 / len(candidates)] * len(candidates))

        _absorb_fused_ops(sch)
        tile = _tile_pixels if name == PIXEL_CONV_BLOCK else _tile
        tile(sch, block, sch.get_sblock(OUTPUT_BLOCK), sample)
        # The function is fully scheduled here: keep MetaSchedule's generic rules off the root block (its
        # parallel/vectorise annotation would be rewritten onto loops that are already parallel).
        sch.annotate(sch.get_sblock("root"), "schedule_rule", "None")
    elif name == PACK_BLOCK:
        _pack(sch, block)
    return [sch]


tvm.register_global_func(f"s_tir.meta_schedule.cpu.{DOT_RULE}", _tuning_rule, override=True)
