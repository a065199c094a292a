"""Which integer dot-product instruction a target has, and the tensor intrinsic that emits it.

Each intrinsic computes ``C[i] += sum_k A[k] * B[i, k]`` for ``lanes`` outputs ``i`` and ``k < G`` (the
ISA's ``group``: 4 bytes, or 2 16-bit values): ``G`` activations (``A``, broadcast to every lane) against a
``lanes × G`` block of weights, summed into 32-bit lanes without intermediate saturation (lanes over
output channels). The *pixel* form computes
``C[i] += sum_k A[i, k] * B[k]``: ``lanes`` output pixels' 4 activations each against 4 weights broadcast
(lanes over output pixels, so a result vector is a contiguous piece of an NCHW output row); "4" there reads
``G``. The kernels in :mod:`.int8_dot` lay data out so that each block an instruction reads is
``G``·``lanes`` contiguous elements.

- ``avx512_vnni`` (x86 AVX-512 VNNI): ``vpdpbusd`` on 512-bit registers, uint8 × int8, 16 lanes.
- ``avx_vnni`` (x86 AVX-VNNI or AVX-512 VNNI+VL on 256-bit registers): ``vpdpbusd`` on ymm, 8 lanes.
- ``sdot`` (AArch64 ``+dotprod``): ``sdot`` on 128-bit registers, int8 × int8, 4 lanes. Activations are
  uint8 in ohq-tvm, so the kernel shifts them to int8 (``x - 128``) and adds ``128 · Σw`` back.
- ``neon`` (AArch64 without ``+dotprod``: ARMv8.0, e.g. the Cortex-A72 of a Raspberry Pi 4): ``smull``
  (8 int8 × int8 products into int16, exact: at most 128·128) then ``sadalp`` (adjacent int16 pairs added
  into the 4 int32 lanes), ``group`` 2, 4 lanes; activations shifted to int8 as for ``sdot``.
- ``avx2`` (x86 AVX2 without VNNI, e.g. Zen 3, Haswell to Skylake client): ``vpmaddwd`` on ymm, int16 ×
  int16 in pairs (``group`` 2), 8 lanes, and a ``vpaddd`` into the accumulator. Activations are widened
  to int16 once, in the kernel's packing copy, weights offline. Not ``vpmaddubsw`` (uint8 × int8): its
  int16 pair sums saturate (255·127·2 > 32767), so it is not exact.

LLVM 22 declares ``llvm.x86.avx512.vpdpbusd.*`` over byte vectors (``<64 x i8>``), which TVM's own
``dot_16x4_vnni`` intrinsic (written for ``<16 x i32>`` operands) fails LLVM verification with; the
intrinsics here pass byte vectors. The accumulator ``C`` is the kernels' register tile (see
:func:`.loops.register_tile`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T
from tvm.target import Target
from tvm.target.codegen import target_has_features

STACK_BYTES = 1024  # TVM's kMaxStackAlloca: a larger allocation is a TVMBackendAllocWorkspace call


@dataclass(frozen=True)
class DotProductISA:
    """One dot-product instruction family: its name, lanes per instruction and the data types it takes."""

    name: str
    lanes: int
    activation_dtype: str  # what the instruction multiplies: uint8 (vpdpbusd), int8 (sdot), int16 (avx2)
    intrinsic: str  # registered TensorIntrin name: lanes over output channels (weights vary per lane)
    instruction: str = "vpdpbusd"  # its assembly mnemonic
    group: int = 4  # products summed into each 32-bit lane per instruction (4 bytes or 2 int16)
    weight_dtype: str = "int8"
    registers: int = 32  # vector registers: the register tile's budget
    accumulates: bool = True  # the instruction adds into its accumulator (vpmaddwd needs a separate add)
    accumulator_dtype: str = "int32"

    @property
    def pixel_intrinsic(self) -> str:
        """The registered TensorIntrin with lanes over output pixels (activations vary per lane, the
        4 weights are broadcast)."""
        return f"{self.intrinsic}_pixels"

    @property
    def activation_offset(self) -> int:
        """What is subtracted from the uint8 activations before the instruction sees them."""
        return 128 if self.activation_dtype == "int8" else 0

    @property
    def max_tile(self) -> int:
        """Accumulators a register tile may hold: the registers less those the operands need, and less
        than the 1 KiB TVM keeps on the stack (AVX-512: 15 of 64 bytes), since a larger tile becomes a
        workspace allocation on every tile (see :func:`.loops.register_tile`)."""
        by_registers = self.registers // 2 if self.registers >= 32 else self.registers - 4
        return min(by_registers, (STACK_BYTES - 1) // (4 * self.lanes))


AVX512_VNNI = DotProductISA("avx512_vnni", 16, "uint8", "ohq_dot_u8i8_16x4_avx512vnni")
# Chosen only without AVX-512BW (dot_product_isa), so on 16 ymm registers (Alder Lake and later cores).
AVX_VNNI = DotProductISA("avx_vnni", 8, "uint8", "ohq_dot_u8i8_8x4_avxvnni", registers=16)
SDOT = DotProductISA("sdot", 4, "int8", "ohq_dot_i8i8_4x4_sdot", instruction="sdot")
NEON = DotProductISA("neon", 4, "int8", "ohq_dot_i8i8_4x2_neon", instruction="sadalp", group=2)
AVX2 = DotProductISA(
    "avx2",
    8,
    "int16",
    "ohq_dot_i16i16_8x2_avx2",
    "vpmaddwd",
    group=2,
    weight_dtype="int16",
    registers=16,
    accumulates=False,
)
# fp32 multiply-adds in the same channel form (lanes over output channels, one activation broadcast):
# for float 1x1 convs whose maps no register width divides (14x14, 7x7), where vectors along the pixels
# would be short. ``group`` 1: no packing of activations beyond the copy.
FMA_AVX512 = DotProductISA(
    "fma_avx512",
    16,
    "float32",
    "ohq_fma_f32_16_avx512",
    "vfmadd",
    group=1,
    weight_dtype="float32",
    accumulator_dtype="float32",
)
FMA_AVX2 = DotProductISA(
    "fma_avx2",
    8,
    "float32",
    "ohq_fma_f32_8_avx2",
    "vfmadd",
    group=1,
    weight_dtype="float32",
    registers=16,
    accumulator_dtype="float32",
)
FMA_NEON = DotProductISA(
    "fma_neon",
    4,
    "float32",
    "ohq_fma_f32_4_neon",
    "fmla",
    group=1,
    weight_dtype="float32",
    accumulator_dtype="float32",
)
FLOAT_ISAS = (FMA_AVX512, FMA_AVX2, FMA_NEON)
ISAS = {isa.name: isa for isa in (AVX512_VNNI, AVX_VNNI, SDOT, NEON, AVX2, *FLOAT_ISAS)}


def _has(feature: str, target: Target) -> bool:
    try:
        return bool(target_has_features(feature, target))
    except Exception:  # a target LLVM cannot describe (unknown mcpu): assume the feature is absent
        return False


def usable_isas(target: Target) -> list[DotProductISA]:
    """Every dot-product instruction family ``target`` can run, widest first (an AVX-512 VNNI CPU with
    AVX-512 VL also runs the 8-lane ymm form)."""
    best = dot_product_isa(target)
    if best is AVX512_VNNI and _has("avx512vl", target):
        return [AVX512_VNNI, AVX_VNNI]
    return [best] if best is not None else []


def _cpu_family(target: Target) -> str | None:
    """``"aarch64"`` or ``"x86"`` (an LLVM target without a triple is the host, taken as x86), else
    ``None`` (not an LLVM CPU target, or another architecture)."""
    if target.kind.name != "llvm":
        return None
    triple = str(target.attrs.get("mtriple", "") or "")
    if triple.startswith(("aarch64", "arm64")):
        return "aarch64"
    if not triple or triple.startswith(("x86_64", "i686", "i386")):
        return "x86"
    return None


def dot_product_isa(target: Target) -> DotProductISA | None:
    """The best dot-product instruction ``target`` has (from its mcpu/mattr), or ``None``."""
    family = _cpu_family(target)
    if family == "aarch64":
        return SDOT if _has("dotprod", target) else NEON if _has("neon", target) else None
    if family != "x86":
        return None
    if _has("avx512vnni", target) and _has("avx512bw", target):
        return AVX512_VNNI
    if _has("avxvnni", target) or (_has("avx512vnni", target) and _has("avx512vl", target)):
        return AVX_VNNI
    if _has("avx2", target):
        return AVX2
    return None


def float_isa(target: Target) -> DotProductISA | None:
    """The fp32 multiply-add form ``target`` runs (AVX-512F, AVX2 with FMA, AArch64 NEON), or ``None``."""
    family = _cpu_family(target)
    if family == "aarch64":
        return FMA_NEON
    if family != "x86":
        return None
    if _has("avx512f", target):
        return FMA_AVX512
    if _has("avx2", target) and _has("fma", target):
        return FMA_AVX2
    return None


def _dot_description(isa: DotProductISA):
    lanes, group, dtype, wdtype = isa.lanes, isa.group, isa.activation_dtype, isa.weight_dtype

    @T.prim_func(s_tir=True)
    def description(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (group,), dtype, offset_factor=1)
        B = T.match_buffer(b, (lanes, group), wdtype, offset_factor=1)
        C = T.match_buffer(c, (lanes,), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:group], B[0:lanes, 0:group])
            T.writes(C[0:lanes])
            for i in T.serial(0, lanes):
                for k in T.serial(0, group):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")

    return description


def _group_word(isa: DotProductISA) -> str:
    """The integer type as wide as one ``group`` of operands (32 bits; ``neon``'s 2 bytes: 16), which a
    broadcast copies to every lane."""
    return f"int{isa.group * np.dtype(isa.activation_dtype).itemsize * 8}"


def _instruction(isa: DotProductISA, accumulator, activations, weights):
    """The instruction's result: ``accumulator`` plus the ``group``-wise dot products of the two operand
    vectors (``vpdpbusd`` and ``sdot`` accumulate themselves; ``vpmaddwd`` is followed by an add)."""
    lanes = isa.lanes
    if isa is NEON:  # the int16 products, then their pairs added into the accumulator (smull, sadalp)
        products = T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.smull.v8i16"), activations, weights, dtype="int16x8"
        )
        intrinsic = T.llvm_lookup_intrinsic_id(_LLVM_INTRINSICS[isa.name])
        return accumulator + T.call_llvm_pure_intrin(intrinsic, products, dtype=f"int32x{lanes}")
    intrinsic = T.llvm_lookup_intrinsic_id(_LLVM_INTRINSICS[isa.name])
    if isa.accumulates:
        return T.call_llvm_pure_intrin(intrinsic, accumulator, activations, weights, dtype=f"int32x{lanes}")
    return accumulator + T.call_llvm_pure_intrin(intrinsic, activations, weights, dtype=f"int32x{lanes}")


def _dot_implementation(isa: DotProductISA):
    """Broadcast the ``group`` activations (32 bits) to every 32-bit lane, load the weight block, call."""
    lanes, group, dtype, wdtype = isa.lanes, isa.group, isa.activation_dtype, isa.weight_dtype
    elements = lanes * group

    @T.prim_func(s_tir=True)
    def implementation(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (group,), dtype, offset_factor=1)
        B = T.match_buffer(b, (lanes, group), wdtype, offset_factor=1)
        C = T.match_buffer(c, (lanes,), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:group], B[0:lanes, 0:group])
            T.writes(C[0:lanes])
            # Operands inline: a name bound here becomes a one-element ``local`` buffer, which lowers to
            # a workspace allocation on every call.
            C[T.ramp(T.int32(0), 1, lanes)] = _instruction(
                isa,
                C.vload([0], dtype=f"int32x{lanes}"),
                T.reinterpret(
                    T.broadcast(
                        T.reinterpret(A.vload([0], f"{dtype}x{group}"), dtype=_group_word(isa)), lanes
                    ),
                    dtype=f"{dtype}x{elements}",
                ),
                B.vload([0, 0], dtype=f"{wdtype}x{elements}"),
            )

    return implementation


def _pixel_description(isa: DotProductISA):
    lanes, group, dtype, wdtype = isa.lanes, isa.group, isa.activation_dtype, isa.weight_dtype

    @T.prim_func(s_tir=True)
    def description(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (lanes, group), dtype, offset_factor=1)
        B = T.match_buffer(b, (group,), wdtype, offset_factor=1)
        C = T.match_buffer(c, (lanes,), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:lanes, 0:group], B[0:group])
            T.writes(C[0:lanes])
            for i in T.serial(0, lanes):
                for k in T.serial(0, group):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        C[vi] = C[vi] + T.cast(A[vi, vk], "int32") * T.cast(B[vk], "int32")

    return description


def _pixel_implementation(isa: DotProductISA):
    """Load ``lanes`` pixels × ``group`` activations as one vector, broadcast the ``group`` weights, call."""
    lanes, group, dtype, wdtype = isa.lanes, isa.group, isa.activation_dtype, isa.weight_dtype
    elements = lanes * group

    @T.prim_func(s_tir=True)
    def implementation(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (lanes, group), dtype, offset_factor=1)
        B = T.match_buffer(b, (group,), wdtype, offset_factor=1)
        C = T.match_buffer(c, (lanes,), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:lanes, 0:group], B[0:group])
            T.writes(C[0:lanes])
            C[T.ramp(T.int32(0), 1, lanes)] = _instruction(
                isa,
                C.vload([0], dtype=f"int32x{lanes}"),
                A.vload([0, 0], dtype=f"{dtype}x{elements}"),
                T.reinterpret(
                    T.broadcast(
                        T.reinterpret(B.vload([0], f"{wdtype}x{group}"), dtype=_group_word(isa)), lanes
                    ),
                    dtype=f"{wdtype}x{elements}",
                ),
            )

    return implementation


def _fma_description(isa: DotProductISA):
    lanes = isa.lanes

    @T.prim_func(s_tir=True)
    def description(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (1,), "float32", offset_factor=1)
        B = T.match_buffer(b, (lanes, 1), "float32", offset_factor=1)
        C = T.match_buffer(c, (lanes,), "float32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:1], B[0:lanes, 0:1])
            T.writes(C[0:lanes])
            # The kernels' unit reduction loop (``group`` 1) stays a loop; its variable binds nothing.
            for i in T.serial(0, lanes):
                for _k in T.serial(0, 1):
                    with T.sblock("update"):
                        vi = T.axis.remap("S", [i])
                        C[vi] = C[vi] + A[0] * B[vi, 0]

    return description


def _fma_implementation(isa: DotProductISA):
    """Broadcast the activation, load ``lanes`` weights, multiply-add (LLVM contracts it to one FMA)."""
    lanes = isa.lanes

    @T.prim_func(s_tir=True)
    def implementation(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (1,), "float32", offset_factor=1)
        B = T.match_buffer(b, (lanes, 1), "float32", offset_factor=1)
        C = T.match_buffer(c, (lanes,), "float32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:1], B[0:lanes, 0:1])
            T.writes(C[0:lanes])
            C[T.ramp(T.int32(0), 1, lanes)] = C.vload([0], dtype=f"float32x{lanes}") + T.broadcast(
                A[0], lanes
            ) * B.vload([0, 0], dtype=f"float32x{lanes}")

    return implementation


_LLVM_INTRINSICS = {
    AVX512_VNNI.name: "llvm.x86.avx512.vpdpbusd.512",
    AVX_VNNI.name: "llvm.x86.avx512.vpdpbusd.256",  # LLVM selects the VEX form on AVX-VNNI CPUs
    SDOT.name: "llvm.aarch64.neon.sdot.v4i32.v16i8",
    NEON.name: "llvm.aarch64.neon.saddlp.v4i32.v8i16",  # with the add: LLVM selects sadalp
    AVX2.name: "llvm.x86.avx2.pmadd.wd",
}


def register_intrinsics(isas=None) -> None:
    """Register the tensor intrinsics of ``isas`` (default: every ISA), once per process. Parsing an
    intrinsic's TVMScript takes about 0.15 s, so each schedule registers only the ISA it tensorizes with
    (:func:`ohq_tvm.kernels.schedule`); replaying tuning records registers them all."""
    for isa in ISAS.values() if isas is None else isas:
        if TensorIntrin.get(isa.intrinsic, allow_missing=True) is not None:
            continue
        if isa in FLOAT_ISAS:
            TensorIntrin.register(isa.intrinsic, _fma_description(isa), _fma_implementation(isa))
            continue
        TensorIntrin.register(isa.intrinsic, _dot_description(isa), _dot_implementation(isa))
        TensorIntrin.register(isa.pixel_intrinsic, _pixel_description(isa), _pixel_implementation(isa))
