"""Loop arithmetic and schedule steps shared by the kernels' schedules and the default schedules of
:mod:`ohq_tvm.codegen`: extents, vector widths, parallel loops, folding fused neighbours into a block."""

from __future__ import annotations

from collections.abc import Callable

import tvm
from tvm import s_tir, tirx
from tvm.target import Target
from tvm.target.codegen import llvm_get_vector_width, target_has_features

MIN_LANES = 4


def allow_vector_rounding() -> None:
    """Let ``VectorizeLoop`` vectorise ``nearbyint`` (round half to even: quantize and requantize).

    TVM marks ``round``, ``floor``, ``exp``... vectorizable but not ``nearbyint``, so every loop that
    rounds (each integer epilogue, each quantize) is silently scalarised. LLVM's ``llvm.nearbyint`` is
    defined on vectors (``vrndscaleps`` on AVX-512, ``frinti`` on NEON), so the attribute is all it takes.
    """
    op = tvm.ir.Op.get("tirx.nearbyint")
    if not op.get_attr("TVectorizable"):
        tvm.ir.register_op_attr("tirx.nearbyint", "TVectorizable", True)


allow_vector_rounding()


def extent(sch: s_tir.Schedule, loop) -> int | None:
    """A loop's constant extent, or ``None`` when it is symbolic."""
    value = sch.get(loop).extent
    return int(value.value) if isinstance(value, tirx.IntImm) else None


def fp32_lanes(target: Target) -> int:
    """fp32 lanes of the widest vector register the target has: 16 with AVX-512, 8 with AVX/AVX2, 4 with
    SSE or NEON.

    From the target's features, not ``llvm_get_vector_width``: that answers 512 bits for every x86 CPU
    (Haswell and Zen 3 included), and 16-lane schedules on 8-lane registers were measured several times
    slower on a Zen 3 (a 14-wide vector per row is two masked ymm halves; AVX2 has no mask registers).
    """
    if target.kind.name != "llvm":
        return MIN_LANES
    triple = str(target.attrs.get("mtriple", "") or "")
    if not triple or triple.startswith(("x86_64", "i686", "i386")):
        for feature, lanes in (("avx512f", 16), ("avx", 8)):
            if _has_feature(feature, target):
                return lanes
        return MIN_LANES
    try:
        bits = int(llvm_get_vector_width(target))
    except Exception:  # unknown CPU: SSE/NEON width is a safe floor
        bits = 128
    return max(MIN_LANES, bits // 32)


def _has_feature(feature: str, target: Target) -> bool:
    try:
        return bool(target_has_features(feature, target))
    except Exception:  # a target LLVM cannot describe (unknown mcpu): assume the feature is absent
        return False


def vector_factor(length: int | None, lanes: int) -> int | None:
    """Vector width for an axis of ``length``: the largest power of two ≤ ``lanes`` dividing it, else the
    smallest power of two ≥ 4 covering it (e.g. 14 → 16 lanes, 7 → 8), the tail masked off."""
    if length is None or length < MIN_LANES:
        return None
    factor = lanes
    while factor >= MIN_LANES:
        if length % factor == 0:
            return factor
        factor //= 2
    covering = MIN_LANES
    while covering < min(length, lanes):
        covering *= 2
    return covering


REGISTER_TILE = "ohq_register_tile"


def register_tile(sch: s_tir.Schedule, block: s_tir.SBlockRV) -> None:
    """Mark ``block``'s output as a register tile (its loops already tiled, the tile's loops unrolled or
    vectorised, its consumers computed per tile). The buffer keeps the default ``global`` scope: TVM
    allocates it in the innermost loop that covers the tile, and lowers a ``global`` CPU allocation under
    1 KiB to a stack array, which LLVM keeps in registers. A ``local`` one becomes a
    ``TVMBackendAllocWorkspace`` call and a free on every tile instead (measured: half the time of a
    16→96 1×1 int8 conv at 112×112). Tests and readers find tiles by the annotation."""
    sch.annotate(block, REGISTER_TILE, 1)


def parallel(sch: s_tir.Schedule, loops: list):
    """Fuse ``loops`` and run the result in parallel; returns the fused loop (``None`` for no loops). A
    fused loop of one iteration stays serial: a parallel launch of nothing still wakes every thread."""
    if not loops:
        return None
    fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    if extent(sch, fused) != 1:
        sch.parallel(fused)
    return fused


def attempt(action: Callable, *args) -> bool:
    """Apply a schedule primitive; ``False`` (and no change) when TVM refuses it."""
    try:
        action(*args)
        return True
    except Exception:  # a schedule primitive refused: the caller falls back
        return False


def fold_consumers(sch: s_tir.Schedule, block: s_tir.SBlockRV) -> None:
    """Reverse-inline ``block``'s element-wise consumer into it, repeatedly, while it has exactly one.
    With two (a precision mask's ``out + m * (other - out)`` reads the output twice), TVM would inline one
    and leave the other reading a buffer nobody writes any more."""
    while len(consumers := sch.get_consumers(block)) == 1 and attempt(
        sch.reverse_compute_inline, consumers[0]
    ):
        pass


def inline_other_blocks(
    sch: s_tir.Schedule, own: set[str], fallback: Callable[[s_tir.SBlockRV], None]
) -> None:
    """Inline every block at the root not named in ``own``; ``fallback`` schedules one that cannot be."""
    for block in sch.get_child_blocks(sch.get_sblock("root")):
        if sch.get(block).name_hint not in own and not attempt(sch.compute_inline, block):
            fallback(block)
