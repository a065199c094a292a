"""Zero-budget schedule of an NCHW 2-D convolution (regular or depthwise), with what FuseOps put around it.

The conv block is tiled into a register tile held in a ``local`` accumulator, the reduction loops
outside the tile, so each loaded input vector is reused across the tile:

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
from ..kernels.loops import attempt, extent, fold_consumers, inline_other_blocks, parallel, vector_factor

_REGULAR_CHANNELS = (8, 4, 2)
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
            width = int(block.iter_vars[3].dom.extent)
            if regular_vector(width, lanes) is None:
                return None
        return block_rv, depthwise
    return None


def regular_vector(width: int | None, lanes: int) -> int | None:
    """The output-column vector of a regular conv's register tile: one that divides the row (a
    predicated tile was measured several times slower). A power of two of at least 8 lanes when one
    divides it, else the widest divisor between 4 and ``lanes`` (14 for 14- and 28-wide rows, 7 for 7:
    LLVM widens such vectors to the register, which beats 4 lanes or a masked tail); None without."""
    if width is None:
        return None
    factor = lanes
    while factor >= 8:
        if width % factor == 0:
            return factor
        factor //= 2
    return next((d for d in range(min(width, lanes), 3, -1) if width % d == 0), None)


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
    n, channel, y, x, *reduce = sch.get_loops(conv)
    producers = list(sch.get_producers(conv))
    epilogue = _fold_epilogue(sch, conv)
    own = {sch.get(b).name_hint for b in [conv, *producers, *([epilogue] if epilogue else [])]}
    inline_other_blocks(sch, own, lambda block: _schedule_producer_stage(sch, block, lanes))
    width = extent(sch, x)
    vector = vector_factor(width, lanes) if depthwise else regular_vector(width, lanes)
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
        channels = extent(sch, channel)
        width = next((c for c in _REGULAR_CHANNELS if channels % c == 0), 1)
        c_o, c_i = sch.split(channel, factors=[None, width])
        sch.reorder(n, c_o, y, x_o, *reduce, c_i, *tile_x)
        task = parallel(sch, [n, c_o, y])
        unrolled = c_i
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
        sch.set_scope(conv, 0, "local")
        if vector is not None:
            sch.vectorize(sch.get_loops(epilogue)[-1])
    sch.unroll(unrolled)
    if vector is not None:
        sch.vectorize(tile_x[0])
    init = sch.decompose_reduction(conv, reduce[0])
    if vector is not None:
        sch.vectorize(sch.get_loops(init)[-1])
