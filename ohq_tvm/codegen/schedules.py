"""A zero-budget CPU schedule: every TIR function gets parallel, vectorised loops, never naive ones.

``relax.build`` for CPU schedules nothing (one thread, scalar loops). These rules, applied after Relax
legalization and fusion, give each PrimFunc a sane schedule with no tuning:

- producers that can be inlined (padding, reshapes, element-wise chains) are inlined (a separate padded
  copy was measured slower for stride-2 depthwise convs, faster for the stem: a wash overall);
- a reduction (conv2d, dense, pooling) keeps its reduction loops outside a register tile: the innermost
  output axis is vectorised (contiguous in memory for NCHW and row-major dense) and the channel axis is
  unrolled by a small factor so each loaded input vector serves several output channels;
- element-wise blocks are fused, vectorised and parallelised;
- the outer spatial loops are fused and spread over the cores;
- a depthwise conv is tiled per channel plane instead (see :func:`_schedule_depthwise`);
- the dot-product integer kernels (:mod:`ohq_tvm.kernels`) get their own register-tiled, tensorized
  schedule with default tiles.

Functions the rules cannot analyse are left to the default (still correct, just slow), and counted by
:func:`unscheduled_functions` so tests and benchmarks can see them.
"""

from __future__ import annotations

import math

import tvm
from tvm import relax, s_tir, tirx
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.base import ApplyDefaultSchedule, ScheduleRule, try_inline
from tvm.target import Target

from ..kernels import has_dot_kernel
from ..kernels import schedule_default as schedule_dot_kernel
from ..kernels.loops import MIN_LANES, extent, fp32_lanes, parallel, vector_factor
from ..passes import UseCPUKernels
from .conv_schedule import find_conv, schedule_conv

_CHANNEL_UNROLL = (4, 2)


class CPUDefaultRule(ScheduleRule):
    """Schedule one PrimFunc as described in the module docstring; ``None`` when it cannot analyse it."""

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool) -> s_tir.Schedule | None:
        if not isinstance(func, tirx.PrimFunc) or target.kind.name != "llvm":
            return None
        if has_dot_kernel(func):  # hand-laid-out integer kernels bring their own schedule
            return schedule_dot_kernel(func)
        lanes = fp32_lanes(target)
        sch = s_tir.Schedule(func)
        conv = find_conv(sch, lanes)
        if conv is not None:
            schedule_conv(sch, conv, lanes)
            return sch
        blocks = normalize_prim_func(sch)
        if blocks is None:
            return None
        blocks = try_inline(sch, blocks)
        for block in blocks:
            kinds = block.dom_kind()
            if "O" in kinds:
                continue
            if "R" in kinds:
                self._reduction(sch, block, lanes)
            else:
                self._injective(sch, block, lanes)
        return sch

    @staticmethod
    def _injective(sch: s_tir.Schedule, block, lanes: int) -> None:
        loops = sch.get_loops(block.block_rv)
        if not loops:  # a scalar (rank-0) result: nothing to spread
            return
        row = extent(sch, loops[-1]) if len(loops) > 1 else None
        plane = (row or 0) * (extent(sch, loops[-2]) or 0) if len(loops) > 2 else 0
        total = plane * math.prod(extent(sch, loop) or 0 for loop in loops[:-2])
        if plane % lanes and total % lanes == 0 and _element_wise(sch, block.block_rv):
            # Every operand read where the result is written (a quantize, a dequantize, an add) over
            # planes no vector divides (14x14): one flat loop of full vectors, not rows ending in masked
            # tails (3x faster). Not where a vector divides the plane but not its rows (28x28): TVM's
            # simplifier then leaves the lanes' indices as divisions, and the loop runs scalar (10x
            # slower); rows of 4 lanes serve those.
            outer, inner = sch.split(sch.fuse(*loops), factors=[None, lanes])
            sch.parallel(outer)
            sch.vectorize(inner)
            return
        if row is not None and row >= 2 * MIN_LANES:
            # Rows long enough to vectorise on their own: keeps the index arithmetic of a pad or a
            # layout change per row instead of a division per lane of a flattened loop.
            sch.parallel(sch.fuse(*loops[:-1]) if len(loops) > 2 else loops[0])
            factor = vector_factor(row, lanes)
            if factor is not None:
                sch.vectorize(sch.split(loops[-1], factors=[None, factor])[1])
            return
        fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
        factor = vector_factor(extent(sch, fused), lanes)
        if factor is None:
            sch.parallel(fused)
            return
        outer, inner = sch.split(fused, factors=[None, factor])
        sch.parallel(outer)
        sch.vectorize(inner)

    @staticmethod
    def _reduction(sch: s_tir.Schedule, block, lanes: int) -> None:
        rv = block.block_rv
        loops = sch.get_loops(rv)
        kinds = block.dom_kind()
        spatial = [loop for loop, kind in zip(loops, kinds, strict=True) if kind == "S"]
        reduce = [loop for loop, kind in zip(loops, kinds, strict=True) if kind == "R"]
        if not spatial:
            return
        sch.reorder(*spatial, *reduce)
        inner = spatial[-1]
        factor = vector_factor(extent(sch, inner), lanes)
        tile_inner: list = []
        outer_spatial = spatial[:-1]
        if factor is not None:
            inner_o, inner_i = sch.split(inner, factors=[None, factor])
            outer_spatial = [*spatial[:-1], inner_o]
            tile_inner = [inner_i]
        # Unroll the channel axis (NCHW: third from last, the batch axis may be squeezed away) so one
        # input vector feeds several output channels.
        channel = spatial[-3] if len(spatial) >= 3 else None
        if channel is not None and factor is not None:
            length = extent(sch, channel)
            unroll = next((u for u in _CHANNEL_UNROLL if length and length % u == 0), None)
            if unroll is not None:
                channel_o, channel_i = sch.split(channel, factors=[None, unroll])
                outer_spatial = [channel_o if loop == channel else loop for loop in outer_spatial]
                tile_inner = [channel_i, *tile_inner]
        sch.reorder(*outer_spatial, *reduce, *tile_inner)
        parallel(sch, outer_spatial)
        # Vectorise before splitting off the initialisation: TVM refuses to vectorise a loop over a
        # reduction block once its init has been decomposed.
        if len(tile_inner) == 2:
            sch.unroll(tile_inner[0])
        if factor is not None:
            sch.vectorize(tile_inner[-1])
        if reduce:
            init = sch.decompose_reduction(rv, reduce[0])
            if factor is not None:
                sch.vectorize(sch.get_loops(init)[-1])


def _element_wise(sch: s_tir.Schedule, block_rv) -> bool:
    """Whether every buffer ``block_rv`` reads is read at the element it writes, or is a single
    element (a scale, a zero point), so its loops can be fused into one contiguous axis."""
    block = sch.get(block_rv)
    (write,) = block.writes
    shape = [int(d) for d in write.source.shape]
    written = [str(r.min) for r in write.region]
    for read in block.reads:
        read_shape = [int(d) for d in read.source.shape]
        if math.prod(read_shape) == 1:
            continue
        if read_shape != shape or [str(r.min) for r in read.region] != written:
            return False
    return True


def default_cpu_schedule() -> tvm.transform.Pass:
    """A module pass that schedules every unscheduled PrimFunc with :class:`CPUDefaultRule`.

    Apply it after Relax legalization/fusion, inside ``with target:`` (the rule needs the target's vector
    width). Functions it cannot analyse stay as they were.
    """
    return ApplyDefaultSchedule(CPUDefaultRule())


def fusion_passes(target: Target) -> list[tvm.transform.Pass]:
    """What the CPU pipeline runs before scheduling: integer layers onto their kernels
    (``UseCPUKernels``), library dispatch, legalization, constant folding and fusion. Tuning
    extracts its tasks after exactly these passes, so they are written once, here."""
    from tvm.relax.backend.cpu_generic import pipeline as cpu_generic

    return [
        UseCPUKernels(target),
        *cpu_generic.library_dispatch_passes(target),
        *cpu_generic.legalize_passes(target),
    ]


def lowering_passes(target: Target) -> list[tvm.transform.Pass]:
    """What the CPU pipeline runs after scheduling: Relax dataflow lowering and finalization."""
    from tvm.relax.backend.cpu_generic import pipeline as cpu_generic

    return [*cpu_generic.dataflow_lower_passes(target), *cpu_generic.finalize_passes(target)]


def cpu_pipeline(target: Target) -> tvm.transform.Pass:
    """Relax's CPU pipeline with :func:`default_cpu_schedule` between :func:`fusion_passes` and
    :func:`lowering_passes`."""

    @tvm.transform.module_pass(opt_level=0, name="OHQCPUPipeline")
    def _pipeline(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        with target:
            passes = [*fusion_passes(target), default_cpu_schedule(), *lowering_passes(target)]
            return tvm.transform.Sequential(passes)(mod)

    return _pipeline


def build_scheduled(mod: tvm.IRModule, target: Target) -> relax.Executable:
    """``relax.build`` with the zero-budget schedule applied to every TIR function."""
    return relax.build(mod, target, relax_pipeline=cpu_pipeline(target))


def unscheduled_functions(mod: tvm.IRModule) -> list[str]:
    """Names of PrimFuncs not marked scheduled (for checks that nothing was left naive)."""
    return [
        gv.name_hint
        for gv, func in mod.functions_items()
        if isinstance(func, tirx.PrimFunc) and not func.attrs.get("tirx.is_scheduled", False)
    ]
