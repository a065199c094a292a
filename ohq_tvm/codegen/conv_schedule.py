"""Zero-budget schedule of an NCHW 2-D convolution (regular or depthwise), with what FuseOps put around it.

The conv block is tiled into a register tile (:func:`~ohq_tvm.kernels.loops.register_tile`), the reduction
loops outside the tile, so each loaded input vector is reused across the tile:

- **regular conv** (1×1 included): ``channels × vector`` outputs (8 output channels unrolled × one
  vector of output columns); a padded input is its own parallel, vectorised stage (inlined, every tap
  would load through a predicate: measured 2-3× slower), a pad of nothing (TOPI's 1×1) is inlined;
- **depthwise conv**: ``rows × vector`` outputs of one channel; each parallel task owns a channel plane
  and builds that plane's padded copy in cache first (for the plane kernel of
  :mod:`ohq_tvm.kernels.depthwise`: a vector copy in the interior, the pad test only at the border).

The element-wise epilogue (bias, activation, requantize, residual add) is computed per tile from the
accumulator, never written to memory in between. Measured on EfficientNet/MobileNet shapes against the
generic reduction rule of :mod:`.schedules` (inlined pad, epilogue as a separate pass): 10-20× faster for
depthwise and for the 3-channel stem.
"""

from __future__ import annotations

import itertools

from tvm import s_tir, tirx

from ..kernels.depthwise import INTERIOR
from ..kernels.loops import (
    attempt,
    extent,
    fold_consumers,
    inline_other_blocks,
    parallel,
    register_tile,
    vector_factor,
)

_REGULAR_CHANNELS = (8, 4, 2)
_WIDE_CHANNELS = (6, 4, 2)
_WIDE_VECTORS = 2
_DEPTHWISE_ROWS = 4


def find_conv(sch: s_tir.Schedule, lanes: int) -> tuple[s_tir.SBlockRV, bool] | None:
    """The conv block of the function (n, c, y, x spatial, then the reduction, reading data and
    weight) and whether it is depthwise (reduction over the kernel window only); ``None`` when there is
    no such block, or when it is a regular conv whose output rows have no divisor
    :func:`regular_vector` accepts (1×1 convs included)."""
    spatial, reduce = tirx.IterVar.DataPar, tirx.IterVar.CommReduce
    for block_rv in sch.get_child_blocks(sch.get_sblock("root")):
        block = sch.get(block_rv)
        kinds = [int(iv.iter_type) for iv in block.iter_vars]
        if kinds[:4] != [spatial] * 4 or not kinds[4:] or any(k != reduce for k in kinds[4:]):
            continue
        if len(sch.get_loops(block_rv)) != len(kinds) or len(kinds) not in (6, 7):
            continue
        if len({region.source for region in block.reads}) < 2:
            continue  # a reduction of one tensor (a mean over batch and pixels), not data x weight
        extents = [int(iv.dom.extent) for iv in block.iter_vars[4:]]
        depthwise = len(extents) == 2 or extents[0] == 1
        if not depthwise:
            height, width = (int(iv.dom.extent) for iv in block.iter_vars[2:4])
            pixels = height * width if extents[1:] == [1, 1] else width  # see _flatten_pointwise
            if regular_vector(width, lanes) is None and regular_vector(pixels, lanes) is None:
                return None
        return block_rv, depthwise
    return None


def regular_vector(width: int | None, lanes: int) -> int | None:
    """The output-column vector of a regular conv's register tile: one that divides the row (a
    predicated tile was measured several times slower). With AVX-512's 16 lanes: a power of two of at
    least 8 that divides it, else the widest divisor between 4 and ``lanes`` (14 for 14- and 28-wide
    rows, 7 for 7: LLVM widens such vectors to the register with a mask, which beats 4 lanes or a
    masked tail). With narrower registers (AVX2, NEON), which have no mask registers, masked vectors
    are what is slow (a 14-wide row as two vectors of 7 ran 5-10x slower on AVX2 than as pairs): a
    power of two of at least 4, else a row one vector covers (7 of 8 lanes), else pairs of columns;
    None without."""
    if width is None:
        return None
    factor = lanes
    while factor >= (8 if lanes >= 16 else 4):
        if width % factor == 0:
            return factor
        factor //= 2
    if lanes >= 16:
        return next((d for d in range(min(width, lanes), 3, -1) if width % d == 0), None)
    if 4 <= width <= lanes:
        return width
    return 2 if width % 2 == 0 else None


def _depthwise_vector(width: int | None, lanes: int) -> int | None:
    """The column vector of a depthwise conv: :func:`vector_factor`, except that a row no register width
    divides and two registers cover is one two-register vector (a 14-wide row as 16 lanes, masked: on
    AVX2 2.5x faster than two masked 8-lane vectors per row, measured on MobileNetV2's 14x14 layers)."""
    if width is not None and width % lanes and width <= 2 * lanes:
        return vector_factor(width, 2 * lanes)
    return vector_factor(width, lanes)


def _fold_epilogue(sch: s_tir.Schedule, conv: s_tir.SBlockRV) -> s_tir.SBlockRV | None:
    """Merge the chain of element-wise consumers into the first one; that block (or ``None``)."""
    consumers = list(sch.get_consumers(conv))
    if len(consumers) != 1:
        return None
    epilogue = consumers[0]
    fold_consumers(sch, epilogue)
    return epilogue


def _schedule_producer_stage(sch: s_tir.Schedule, block: s_tir.SBlockRV, lanes: int) -> None:
    """A pad (or other producer) at root: parallel over rows, each row vectorised."""
    loops = sch.get_loops(block)
    if len(loops) < 2:
        return
    parallel(sch, loops[:-1])
    factor = vector_factor(extent(sch, loops[-1]), lanes)
    if factor is not None:
        sch.vectorize(sch.split(loops[-1], factors=[None, factor])[1])


def _is_copy(sch: s_tir.Schedule, block: s_tir.SBlockRV) -> bool:
    """Whether ``block`` writes a buffer of the same shape as the one buffer it reads (a zero pad)."""
    stmt = sch.get(block)
    if len(stmt.reads) != 1 or len(stmt.writes) != 1:
        return False
    shape = [int(d) for d in stmt.writes[0].source.shape]
    return shape == [int(d) for d in stmt.reads[0].source.shape]


def _partition(sch: s_tir.Schedule, loop, first: int, last: int) -> list[tuple[object, bool]]:
    """Cut ``loop`` at ``first`` and ``last``: the pieces, each with whether it lies in [first, last)."""
    length = extent(sch, loop)
    cuts = [c for c in (first, last) if 0 < c < length]
    if not cuts:
        return [(loop, first <= 0 and length <= last)]
    bounds = [0, *cuts, length]
    segments = list(itertools.pairwise(bounds))
    pieces = sch.loop_partition(loop, [b - a for a, b in segments[:-1]] + [None])
    return [(piece, first <= a and b <= last) for piece, (a, b) in zip(pieces, segments, strict=True)]


def _flatten_pointwise(sch: s_tir.Schedule, conv, producers: list, epilogue, lanes: int) -> bool:
    """A 1x1 stride-1 unpadded conv reads its input pixels in the order it writes them: fuse rows and
    columns into one pixel axis (conv and epilogue), so the vector runs along ``H*W`` (196 = 49 x 4
    for a 14x14 map, where a row of 14 has no power-of-two vector of 4 or more). ``False`` (and
    nothing changed) for other convs."""
    block = sch.get(conv)
    ivs = block.iter_vars
    if len(ivs) != 7 or any(int(iv.dom.extent) != 1 for iv in ivs[5:]):
        return False
    height, width = int(ivs[2].dom.extent), int(ivs[3].dom.extent)
    if regular_vector(height * width, lanes) is None:
        return False  # 49 pixels of a 7x7 map: its 7-wide rows are one (masked) vector each
    if not all(_is_copy(sch, p) for p in producers):
        return False
    shapes = [[int(d) for d in region.source.shape] for region in block.reads]
    if not any(len(s) == 4 and s[2:] == [height, width] and s[1] == int(ivs[4].dom.extent) for s in shapes):
        return False
    for producer in producers:
        if not attempt(sch.compute_inline, producer):
            return False
    sch.transform_block_layout(conv, lambda n, c, y, x, rc, kh, kw: (n, c, y * width + x, rc, kh, kw))
    if epilogue is not None:
        # the accumulator (the conv's own buffer) is stored per pixel, so a tile of the pixel axis maps
        # to one contiguous piece of it, not to the bounding box of the rows it touches
        sch.transform_layout(conv, ("write", 0), lambda n, c, y, x: (n, c, y * width + x))
        sch.transform_block_layout(epilogue, lambda n, c, y, x: (n, c, y * width + x))
    return True


def _copy_planes(sch: s_tir.Schedule, block: s_tir.SBlockRV, task) -> None:
    """Vectorise a channel's padded plane built inside the parallel ``task``. With the kernel's
    interior annotation (:mod:`ohq_tvm.kernels.depthwise`), rows and columns are partitioned so the
    interior is an unconditional vector copy and only the border computes the pad test."""
    interior = sch.get(block).annotations.get(INTERIOR)
    if interior is None:
        return
    top, bottom, first, last = (int(v) for v in interior)
    loops = sch.get_loops(block)
    rows = loops[[sch.get(loop).same_as(sch.get(task)) for loop in loops].index(True) + 1]
    for piece, _ in _partition(sch, rows, top, bottom):
        for leaf in sch.get_child_blocks(piece):
            columns = sch.get_loops(leaf)[-1]
            for part, inside in _partition(sch, columns, first, last):
                if inside:
                    sch.vectorize(part)


def schedule_conv(sch: s_tir.Schedule, found: tuple[s_tir.SBlockRV, bool], lanes: int) -> None:
    """Schedule the function around the conv block ``found`` (from :func:`find_conv`), as described in
    the module docstring. Other blocks that can be inlined are; anything else becomes a parallel stage."""
    conv, depthwise = found
    producers = list(sch.get_producers(conv))
    epilogue = _fold_epilogue(sch, conv)
    own = {sch.get(b).name_hint for b in [conv, *producers, *([epilogue] if epilogue else [])]}
    inline_other_blocks(sch, own, lambda block: _schedule_producer_stage(sch, block, lanes))
    if not depthwise and _flatten_pointwise(sch, conv, producers, epilogue, lanes):
        producers = []
        n, channel, x, *reduce = sch.get_loops(conv)
        y = None
    else:
        n, channel, y, x, *reduce = sch.get_loops(conv)
    width = extent(sch, x)
    vector = _depthwise_vector(width, lanes) if depthwise else regular_vector(width, lanes)
    x_o, tile_x = x, []
    if vector is not None:
        x_o, x_i = sch.split(x, factors=[None, vector])
        tile_x = [x_i]
    if depthwise:
        rows = max(d for d in range(1, _DEPTHWISE_ROWS + 1) if extent(sch, y) % d == 0)
        y_o, y_i = sch.split(y, factors=[None, rows])
        sch.reorder(n, channel, y_o, x_o, *reduce, y_i, *tile_x)
        task = parallel(sch, [n, channel])
        unrolled = y_i
    else:
        # A full register of columns: 6 output channels x 2 vectors (12 accumulators, each loaded
        # input vector used 6 times, each broadcast weight twice); a narrower vector (a 4-lane piece of
        # a 196-pixel map, a pair of columns): 8 channels x 1.
        full = vector == lanes
        channels = extent(sch, channel)
        width = next((c for c in (_WIDE_CHANNELS if full else _REGULAR_CHANNELS) if channels % c == 0), 1)
        c_o, c_i = sch.split(channel, factors=[None, width])
        rows = [y] if y is not None else []
        if full and extent(sch, x_o) % _WIDE_VECTORS == 0:
            x_o, x_v = sch.split(x_o, factors=[None, _WIDE_VECTORS])
            tile_x = [x_v, *tile_x]
        sch.reorder(n, c_o, *rows, x_o, *reduce, c_i, *tile_x)
        task = parallel(sch, [n, c_o, *rows])
        unrolled = c_i
        if len(tile_x) == 2:
            sch.unroll(tile_x[0])
            tile_x = tile_x[1:]
    for producer in producers:
        if _is_copy(sch, producer) and attempt(sch.compute_inline, producer):
            continue  # a pad of nothing (TOPI pads 1x1 convs too): read the input directly
        placed = depthwise and attempt(sch.compute_at, producer, task)
        if placed:
            _copy_planes(sch, producer, task)
        else:
            _schedule_producer_stage(sch, producer, lanes)
    if epilogue is not None:
        sch.reverse_compute_at(epilogue, x_o)
        register_tile(sch, conv)
        if vector is not None:
            last = sch.get_loops(epilogue)[-1]
            if extent(sch, last) > vector:
                last = sch.split(last, factors=[None, vector])[1]
            sch.vectorize(last)
    sch.unroll(unrolled)
    if vector is not None:
        sch.vectorize(tile_x[0])
    init = sch.decompose_reduction(conv, reduce[0])
    if vector is not None:
        sch.vectorize(sch.get_loops(init)[-1])
