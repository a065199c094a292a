"""Dot-product int8 kernels: bit-exact against an integer reference, the instructions really emitted, and
the Relax rewrite that puts them into a quantized model."""

from __future__ import annotations

import re

import numpy as np
import pytest
import tvm
from tvm import relax, te
from tvm.relax.backend.cpu_generic import pipeline as cpu_generic

from ohq_tvm import models
from ohq_tvm.calibration import calibrate
from ohq_tvm.codegen.schedules import CPUDefaultRule
from ohq_tvm.frontend import load_onnx
from ohq_tvm.kernels import (
    AVX2,
    AVX512_VNNI,
    AVX_VNNI,
    NEON,
    SDOT,
    conv2d_dot,
    depthwise_conv2d_planes,
    dot_product_isa,
    float_isa,
    has_dot_kernel,
    pack_conv2d_weight,
    pixel_lanes,
    schedule_default,
    usable_isas,
)
from ohq_tvm.kernels.isa import FMA_AVX2, FMA_AVX512, FMA_NEON
from ohq_tvm.kernels.loops import REGISTER_TILE
from ohq_tvm.layers import quantizable_layers
from ohq_tvm.passes import ApplyPlan, UseCPUKernels
from ohq_tvm.plan import Plan

from kernel_cases import (
    CONV_CASES,
    DENSE_CASES,
    DEPTHWISE_CASES,
    PIXEL_CASES,
    conv_case,
    conv_func,
    dense_case,
    depthwise_reference,
)
from testing_support import host_target, run_local

X86_VNNI = tvm.target.Target({"kind": "llvm", "mcpu": "znver4", "num-cores": 2})
X86_AVX_VNNI = tvm.target.Target({"kind": "llvm", "mcpu": "alderlake"})
X86_NO_VNNI = tvm.target.Target({"kind": "llvm", "mcpu": "skylake"})  # AVX2
X86_AVX2 = tvm.target.Target({"kind": "llvm", "mcpu": "znver3"})
X86_NO_AVX2 = tvm.target.Target({"kind": "llvm", "mcpu": "sandybridge"})  # AVX without AVX2
ARM_DOTPROD = tvm.target.Target(
    {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon", "+dotprod"]}
)
ARM_NEON = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]})

HOST_ISA = dot_product_isa(host_target())
needs_vnni = pytest.mark.skipif(
    HOST_ISA is None or HOST_ISA.name != "avx512_vnni", reason="this CPU has no AVX-512 VNNI"
)
needs_avx2 = pytest.mark.skipif(
    not tvm.target.codegen.target_has_features("avx2", host_target()), reason="this CPU has no AVX2"
)


def test_isa_detection_from_the_target():
    assert dot_product_isa(X86_VNNI) is AVX512_VNNI
    assert dot_product_isa(X86_AVX_VNNI) is AVX_VNNI
    assert dot_product_isa(X86_NO_VNNI) is AVX2
    assert dot_product_isa(X86_AVX2) is AVX2
    assert dot_product_isa(X86_NO_AVX2) is None
    assert dot_product_isa(ARM_DOTPROD) is SDOT
    assert dot_product_isa(ARM_NEON) is NEON  # ARMv8.0 (Raspberry Pi 4): smull + sadalp


def _run(func, target, arrays, out_shape):
    lib = tvm.compile(tvm.IRModule({"main": func}), target=target)
    out = tvm.runtime.empty(out_shape, "int32", tvm.cpu())
    lib.mod["main"](*[tvm.runtime.tensor(a) for a in arrays], out)
    return lib, out.numpy()


@needs_vnni
@pytest.mark.parametrize("isa", [AVX512_VNNI, AVX_VNNI], ids=lambda i: i.name)
@pytest.mark.parametrize(
    "case", CONV_CASES, ids=lambda c: "x".join(map(str, c[0])) + f"-o{c[1]}k{c[2]}s{c[3]}"
)
def test_conv2d_kernel_is_bit_exact(isa, case):
    data, packed, bias, expected = conv_case(isa, *case)
    func = conv_func(isa, *case)
    assert has_dot_kernel(func)
    sch = schedule_default(func)
    lib, out = _run(sch.mod["main"], X86_VNNI, [data, packed, bias], expected.shape)
    np.testing.assert_array_equal(out, expected)
    assert "vpdpbusd" in lib.mod.inspect_source("asm")


@needs_vnni
@pytest.mark.parametrize("isa", [AVX512_VNNI, AVX_VNNI], ids=lambda i: i.name)
@pytest.mark.parametrize(
    "case", PIXEL_CASES, ids=lambda c: "x".join(map(str, c[0])) + f"-o{c[1]}k{c[2]}d{c[5]}"
)
def test_pixel_conv2d_kernel_is_bit_exact(isa, case):
    data, packed, bias, expected = conv_case(isa, *case, pixels=True)
    func = conv_func(isa, *case, pixels=True)
    assert has_dot_kernel(func)
    sch = schedule_default(func)
    lib, out = _run(sch.mod["main"], X86_VNNI, [data, packed, bias], expected.shape)
    np.testing.assert_array_equal(out, expected)
    asm = lib.mod.inspect_source("asm")
    assert f"vpdpbusd\t%{'zmm' if isa is AVX512_VNNI else 'ymm'}" in asm


def test_pixel_form_is_chosen_for_stride_one_rows_the_lanes_divide():
    isas = usable_isas(X86_VNNI)
    assert isas == [AVX512_VNNI, AVX_VNNI]
    assert pixel_lanes(112, (1, 1), isas) is AVX512_VNNI
    assert pixel_lanes(56, (1, 1), isas) is AVX_VNNI  # 56 = 7 x 8
    assert pixel_lanes(28, (1, 1), isas) is None
    assert pixel_lanes(112, (2, 2), isas) is None
    assert usable_isas(X86_NO_VNNI) == [AVX2]
    assert pixel_lanes(56, (1, 1), [AVX2]) is AVX2
    assert usable_isas(X86_NO_AVX2) == []
    assert pixel_lanes(28, (1, 1), usable_isas(ARM_DOTPROD)) is SDOT


@needs_avx2
@pytest.mark.parametrize(
    ("case", "pixels"),
    [(c, False) for c in CONV_CASES] + [(c, True) for c in PIXEL_CASES],
    ids=lambda v: "x".join(map(str, v[0])) + f"-o{v[1]}k{v[2]}s{v[3]}" if isinstance(v, tuple) else str(v),
)
def test_avx2_conv2d_kernel_is_bit_exact(case, pixels):
    # vpmaddwd on int16 pairs: exact where uint8 x int8 pairs (vpmaddubsw) would saturate, so the
    # operands are the extremes: activations up to 255, weights down to -128.
    data, packed, bias, expected = conv_case(AVX2, *case, pixels=pixels)
    assert data.max() == 255 and packed.min() == -128
    sch = schedule_default(conv_func(AVX2, *case, pixels=pixels))
    lib, out = _run(sch.mod["main"], X86_AVX2, [data, packed, bias], expected.shape)
    np.testing.assert_array_equal(out, expected)
    assert re.search(r"vpmaddwd\t[^\n]*%ymm", lib.mod.inspect_source("asm"))


def test_avx2_tiles_fit_its_sixteen_registers():
    assert AVX2.max_tile == 12 and AVX512_VNNI.max_tile == 15 and SDOT.max_tile == 16
    assert AVX_VNNI.max_tile == 12  # 16 ymm without AVX-512
    func = conv_func(AVX2, (1, 64, 14, 14), 64, 3, 1, 1, 1, 0)
    assert REGISTER_TILE in schedule_default(func).mod["main"].script()
    asm = _asm(func, X86_AVX2)
    assert "zmm" not in asm and "vpmaddwd" in asm


def parallel_bodies(asm: str) -> list[str]:
    """The functions TVM outlines for the parallel loops of a compiled module (their assembly)."""
    return [part.split(".Lfunc_end")[0] for part in re.split(r"\n\.L__tvm_parallel_lambda[.\d]*:", asm)[1:]]


@pytest.mark.parametrize("pixels", [False, True])
@pytest.mark.parametrize("isa", [AVX2, AVX512_VNNI, SDOT, NEON], ids=lambda isa: isa.name)
def test_register_tiles_allocate_nothing_per_tile(isa, pixels):
    # The accumulator tile is a stack array LLVM keeps in registers; a ``local`` buffer (or a value the
    # intrinsic binds to a name) had been a TVMBackendAllocWorkspace call + free on every tile.
    target = {"avx2": X86_AVX2, "avx512_vnni": X86_VNNI, "sdot": ARM_DOTPROD, "neon": ARM_NEON}[isa.name]
    case = PIXEL_CASES[0] if pixels else ((1, 16, 14, 14), 32, 1, 1, 0, 1, 0)
    bodies = parallel_bodies(_asm(conv_func(isa, *case, pixels=pixels), target))
    tile = [body for body in bodies if isa.instruction in body]
    assert tile and not any("AllocWorkspace" in body for body in tile)


def test_sdot_arithmetic_is_exact_before_tensorization():
    """The sdot form (activations shifted to int8, 128·Σw added back) computes the same integers; run
    unscheduled on this machine, since an aarch64 board is not at hand in the tests."""
    case = ((1, 19, 9, 9), 21, 3, 2, 1, 1, 200)
    data, packed, bias, expected = conv_case(SDOT, *case)
    _lib, out = _run(conv_func(SDOT, *case), host_target(), [data, packed, bias], expected.shape)
    np.testing.assert_array_equal(out, expected)
    case = PIXEL_CASES[1]
    data, packed, bias, expected = conv_case(SDOT, *case, pixels=True)
    func = conv_func(SDOT, *case, pixels=True)
    _lib, out = _run(func, host_target(), [data, packed, bias], expected.shape)
    np.testing.assert_array_equal(out, expected)


def _asm(func, target) -> str:
    lib = tvm.compile(tvm.IRModule({"main": schedule_default(func).mod["main"]}), target=target)
    return lib.mod.inspect_source("asm")


def test_aarch64_dotprod_assembly_uses_sdot():
    asm = _asm(conv_func(SDOT, (1, 32, 14, 14), 32, 3, 1, 1, 1, 0), ARM_DOTPROD)
    assert "sdot" in asm
    assert asm.count("sdot") >= 9  # one per kernel tap at least
    asm = _asm(conv_func(SDOT, (1, 32, 14, 16), 32, 3, 1, 1, 1, 0, pixels=True), ARM_DOTPROD)
    assert asm.count("sdot") >= 9


@pytest.mark.parametrize("pixels", [False, True])
def test_armv8_0_assembly_uses_smull_and_sadalp(pixels):
    case = PIXEL_CASES[0] if pixels else CONV_CASES[0]
    asm = _asm(conv_func(NEON, *case, pixels=pixels), ARM_NEON)
    assert asm.count("smull") >= 9 and asm.count("sadalp") >= 9
    assert "sdot" not in asm


def test_neon_arithmetic_is_exact_before_tensorization():
    """The neon form (activations shifted to int8, pairs of int8 products summed in int32) computes the
    same integers as the reference; at the extremes, where an int16 sum of two products would overflow."""
    for case, pixels in ((CONV_CASES[3], False), (PIXEL_CASES[1], True)):
        data, packed, bias, expected = conv_case(NEON, *case, pixels=pixels)
        func = conv_func(NEON, *case, pixels=pixels)
        _lib, out = _run(func, host_target(), [data, packed, bias], expected.shape)
        np.testing.assert_array_equal(out, expected)


def test_x86_assembly_uses_vpdpbusd_on_zmm_and_ymm():
    func = conv_func(AVX512_VNNI, (1, 32, 14, 14), 32, 3, 1, 1, 1, 0)
    assert "vpdpbusd\t%zmm" in _asm(func, X86_VNNI)
    func = conv_func(AVX_VNNI, (1, 32, 14, 14), 32, 3, 1, 1, 1, 0)
    assert "vpdpbusd\t%ymm" in _asm(func, X86_AVX_VNNI)


@pytest.mark.parametrize(
    ("isa", "target"),
    [
        pytest.param(AVX512_VNNI, X86_VNNI, marks=needs_vnni, id="avx512_vnni"),
        pytest.param(AVX2, X86_AVX2, marks=needs_avx2, id="avx2"),
    ],
)
@pytest.mark.parametrize(("shape", "columns"), DENSE_CASES, ids=lambda v: str(v))
def test_dense_kernel_is_bit_exact(isa, target, shape, columns):
    func, arrays, expected = dense_case(isa, shape, columns)
    lib, out = _run(schedule_default(func).mod["main"], target, arrays, expected.shape)
    np.testing.assert_array_equal(out, expected)
    assert isa.instruction in lib.mod.inspect_source("asm")


@pytest.fixture(scope="module")
def int8_tiny_cnn():
    imported = load_onnx(models.MODELS["tiny_cnn"]())
    calibration = calibrate(imported, "minmax", num_samples=2)
    plan = Plan.uniform(quantizable_layers(imported.mod), "int8")
    return imported, ApplyPlan(plan, calibration)(imported.mod)


def _dot_funcs(mod):
    return sorted(
        gv.name_hint
        for gv, f in mod.functions_items()
        if isinstance(f, tvm.tirx.PrimFunc) and has_dot_kernel(f)
    )


def test_pass_rewrites_every_integer_layer_to_its_kernel(int8_tiny_cnn):
    _imported, mod = int8_tiny_cnn
    rewritten = UseCPUKernels(X86_VNNI)(mod)
    # tiny_cnn: stem 3x3, two 1x1 convs and an expansion 1x1 (regular), two depthwise, one dense.
    names = _dot_funcs(rewritten)
    assert sum(name.startswith("conv2d_int8") for name in names) == 4
    assert sum(name.startswith("dense_int8") for name in names) == 1
    assert _ops(rewritten, "relax.nn.conv2d") == 0
    assert _ops(rewritten, "relax.nn.pad") == 0  # the stem's zero-point pad is folded into its kernel
    assert len(_funcs(rewritten, "depthwise_conv2d_int8")) == 2
    # AVX2's int16 form takes the same layers.
    avx2 = UseCPUKernels(X86_NO_VNNI)(mod)
    assert [n for n in _dot_funcs(avx2) if "avx2" in n] == _dot_funcs(avx2) and len(_dot_funcs(avx2)) == 5
    # Without a dot-product instruction only the depthwise convs change.
    plain = UseCPUKernels(X86_NO_AVX2)(mod)
    assert _dot_funcs(plain) == [] and len(_funcs(plain, "depthwise_conv2d_int8")) == 2
    assert _ops(plain, "relax.nn.conv2d") == 4
    gpu = tvm.target.Target({"kind": "cuda"})
    assert UseCPUKernels(gpu)(mod).same_as(mod)


def _ops(mod, name):
    calls = [b.value for blk in mod["main"].body.blocks for b in blk.bindings]
    return sum(isinstance(c, relax.Call) and c.op == tvm.ir.Op.get(name) for c in calls)


def _funcs(mod, prefix):
    return [gv.name_hint for gv, _f in mod.functions_items() if gv.name_hint.startswith(prefix)]


@pytest.mark.parametrize("precision", ["int8", "fp32"])
@pytest.mark.parametrize(
    "case", DEPTHWISE_CASES, ids=lambda c: "x".join(map(str, c[0])) + f"-k{c[1]}s{c[2][0]}{c[2][1]}d{c[4][0]}"
)
def test_depthwise_kernel_matches_the_reference(precision, case):
    shape, kernel, strides, padding, dilation, pad_value = case
    rng = np.random.default_rng(5)
    if precision == "int8":
        data = rng.integers(0, 256, shape, dtype=np.uint8)
        weight = rng.integers(-128, 128, (shape[1], 1, kernel, kernel), dtype=np.int8)
    else:
        data = rng.standard_normal(shape).astype(np.float32)
        weight = rng.standard_normal((shape[1], 1, kernel, kernel)).astype(np.float32)
        pad_value = 0
    x = te.placeholder(shape, str(data.dtype), "x")
    w = te.placeholder(weight.shape, "float32", "w")
    out = depthwise_conv2d_planes(
        x, w, strides=strides, padding=padding, dilation=dilation, pad_value=pad_value
    )
    func = te.create_prim_func([x, w, out])
    with host_target():
        scheduled = CPUDefaultRule().apply(func, host_target(), False)
    script = scheduled.mod["main"].script()
    assert "T.unroll" in script  # the depthwise register tile (rows x vector)
    plane = script[
        script.index('T.sblock("ohq_depthwise_pad') : script.index('T.sblock("ohq_depthwise_conv2d')
    ]
    assert "T.vectorized" in plane  # the plane's interior is a vector copy
    expected = depthwise_reference(data, weight, strides, padding, dilation, pad_value)
    lib = tvm.compile(tvm.IRModule({"main": scheduled.mod["main"]}), target=host_target())
    got = tvm.runtime.empty(expected.shape, str(out.dtype), tvm.cpu())
    lib.mod["main"](tvm.runtime.tensor(data), tvm.runtime.tensor(weight.astype(np.float32)), got)
    if precision == "int8":
        np.testing.assert_array_equal(got.numpy(), expected.astype(np.int64))
    else:
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-5)


def test_float_depthwise_layers_get_the_plane_kernel():
    imported = load_onnx(models.tiny_cnn())
    rewritten = UseCPUKernels(X86_NO_VNNI)(imported.mod)
    assert len(_funcs(rewritten, "depthwise_conv2d_fp32")) == 2
    assert _ops(rewritten, "relax.nn.conv2d") == 4  # the regular float convs stay


def test_float_isa_detection_from_the_target():
    assert float_isa(X86_VNNI) is FMA_AVX512
    assert float_isa(X86_AVX2) is FMA_AVX2
    assert float_isa(X86_NO_AVX2) is None  # AVX without FMA
    assert float_isa(ARM_NEON) is FMA_NEON


def _float_pointwise_func(isa, shape, out_c):
    data = te.placeholder(shape, "float32", "data")
    packed = te.placeholder((-(-out_c // isa.lanes), shape[1], 1, 1, isa.lanes, 1), "float32", "packed")
    bias = te.placeholder((out_c,), "float32", "bias")
    geometry = {"kernel": (1, 1), "strides": (1, 1), "padding": (0,) * 4, "dilation": (1, 1), "pad_value": 0}
    out = conv2d_dot(data, packed, bias, isa_name=isa.name, out_channels=out_c, **geometry)
    return te.create_prim_func([data, packed, bias, out])


@needs_avx2
@pytest.mark.parametrize(
    ("shape", "out_c"), [((1, 96, 14, 14), 576), ((1, 160, 7, 7), 36), ((2, 5, 7, 7), 12)], ids=str
)
def test_fp32_channel_form_matches_the_reference(shape, out_c):
    rng = np.random.default_rng(0)
    data = rng.standard_normal(shape).astype(np.float32)
    weight = rng.standard_normal((out_c, shape[1], 1, 1)).astype(np.float32)
    bias = rng.standard_normal(out_c).astype(np.float32)
    packed, _ = pack_conv2d_weight(weight, FMA_AVX2)
    func = _float_pointwise_func(FMA_AVX2, shape, out_c)
    assert has_dot_kernel(func)
    lib = tvm.compile(tvm.IRModule({"main": schedule_default(func).mod["main"]}), target=X86_AVX2)
    out = tvm.runtime.empty((shape[0], out_c, *shape[2:]), "float32", tvm.cpu())
    lib.mod["main"](*[tvm.runtime.tensor(a) for a in (data, packed, bias)], out)
    expected = np.einsum("nchw,oc->nohw", data, weight[:, :, 0, 0]) + bias[None, :, None, None]
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-4, atol=1e-4)
    assert re.search(r"vfmadd\d+ps\t%ymm", lib.mod.inspect_source("asm"))


@pytest.mark.parametrize("isa", [FMA_AVX2, FMA_AVX512, FMA_NEON], ids=lambda isa: isa.name)
def test_fp32_register_tiles_allocate_nothing_per_tile(isa):
    target = {"fma_avx2": X86_AVX2, "fma_avx512": X86_VNNI, "fma_neon": ARM_NEON}[isa.name]
    bodies = parallel_bodies(_asm(_float_pointwise_func(isa, (1, 64, 14, 14), 96), target))
    tile = [body for body in bodies if isa.instruction in body]
    assert tile and not any("AllocWorkspace" in body for body in tile)


def test_fp32_channel_form_emits_fma_on_avx512_and_neon():
    assert re.search(
        r"vfmadd\d+ps\t.*%zmm", _asm(_float_pointwise_func(FMA_AVX512, (1, 64, 7, 7), 32), X86_VNNI)
    )
    assert re.search(r"fmla\tv\d+\.4s", _asm(_float_pointwise_func(FMA_NEON, (1, 64, 7, 7), 32), ARM_NEON))


def _float_pointwise_model(size: int) -> tvm.IRModule:
    """conv 1x1 (16 -> 24) + bias + relu on a ``size`` x ``size`` map, float32."""
    rng = np.random.default_rng(1)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 16, size, size), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            weight = relax.const(rng.standard_normal((24, 16, 1, 1)).astype(np.float32))
            bias = relax.const(rng.standard_normal((1, 24, 1, 1)).astype(np.float32))
            conv = bb.emit(relax.op.nn.conv2d(x, weight))
            out = bb.emit_output(relax.op.nn.relu(bb.emit(relax.op.add(conv, bias))))
        bb.emit_func_output(out)
    return bb.get()


@pytest.mark.parametrize(
    ("target", "size", "rewritten"),
    [
        (X86_AVX2, 14, True),
        (X86_AVX2, 7, True),
        (X86_AVX2, 28, False),
        (ARM_NEON, 14, False),
        (ARM_NEON, 7, True),
    ],
    ids=str,
)
def test_float_pointwise_convs_on_maps_the_lanes_do_not_divide_get_the_channel_form(target, size, rewritten):
    mod = _float_pointwise_model(size)
    after = UseCPUKernels(target)(mod)
    assert bool(_funcs(after, "conv2d_fp32_fma")) is rewritten
    assert _ops(after, "relax.nn.conv2d") == (0 if rewritten else 1)
    assert _ops(after, "relax.add") == (0 if rewritten else 1)  # the bias is the kernel's


@needs_avx2
def test_float_pointwise_model_gives_the_same_outputs():
    mod = _float_pointwise_model(14)
    x = np.random.default_rng(2).standard_normal((1, 16, 14, 14)).astype(np.float32)
    with host_target():
        plain = relax.build(mod, host_target())
    outs = [relax.VirtualMachine(plain, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()]
    from ohq_tvm.codegen import build_executable
    from ohq_tvm.targets import resolve_target

    ex = build_executable(mod, resolve_target("host"))
    outs.append(relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy())
    np.testing.assert_allclose(outs[1], outs[0], rtol=1e-5, atol=1e-5)


def test_rounding_is_vectorised():
    """``nearbyint`` (every requantize and quantize) must not make TVM scalarise the loop around it."""
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def requantize(a: T.Buffer((64,), "int32"), o: T.Buffer((64,), "uint8")):
        for i in T.vectorized(64):
            with T.sblock("r"):
                v = T.axis.spatial(64, i)
                o[v] = T.Cast(
                    "uint8",
                    T.max(
                        T.min(T.nearbyint(T.Cast("float32", a[v]) * T.float32(0.5)), T.float32(255)),
                        T.float32(0),
                    ),
                )

    passes = [
        tvm.s_tir.transform.ConvertBlocksToOpaque(),
        tvm.s_tir.transform.LowerOpaqueBlock(),
        tvm.tirx.transform.FlattenBuffer(),
        tvm.tirx.transform.VectorizeLoop(True),
    ]
    lowered = tvm.transform.Sequential(passes)(tvm.IRModule({"main": requantize}))
    assert 'T.nearbyint(T.Cast("float32x64"' in lowered.script()
    lib = tvm.compile(tvm.IRModule({"main": requantize}), target=host_target())
    out = tvm.runtime.empty((64,), "uint8", tvm.cpu())
    lib.mod["main"](tvm.runtime.tensor(np.arange(64, dtype=np.int32) * 3), out)
    np.testing.assert_array_equal(out.numpy(), np.clip(np.round(np.arange(64) * 1.5), 0, 255))


def test_requantize_is_fused_into_the_kernel(int8_tiny_cnn):
    _imported, mod = int8_tiny_cnn
    with X86_VNNI:
        lowered = tvm.transform.Sequential(
            [
                UseCPUKernels(X86_VNNI),
                *cpu_generic.library_dispatch_passes(X86_VNNI),
                *cpu_generic.legalize_passes(X86_VNNI),
            ]
        )(mod)
    fused = [name for name in _dot_funcs(lowered) if name.startswith("fused_")]
    assert any("round" in name and "clip" in name for name in fused)  # requantize inside a kernel
    assert any("dequantize" in name for name in fused)


@pytest.mark.skipif(HOST_ISA is None, reason="this CPU has no dot-product kernel (VNNI, AVX2)")
def test_a_residual_add_runs_in_the_kernel_s_tiles_and_no_parallel_loop_is_empty(int8_tiny_cnn):
    # The residual add reads the skip's dequantize besides the kernel's output: it used to be left as a
    # scalar parallel pass of its own after the kernel (a thread-pool launch, no vectors).
    from ohq_tvm.codegen.module import lower_for_board
    from ohq_tvm.targets import resolve_target

    _imported, mod = int8_tiny_cnn
    lowered = lower_for_board(mod, resolve_target("host"))
    scripts = {
        gv.name_hint: f.script() for gv, f in lowered.functions_items() if isinstance(f, tvm.tirx.PrimFunc)
    }
    residual = [name for name in scripts if name.startswith("fused_dequantize_conv2d_int8") and "add" in name]
    assert residual
    for name in residual:  # the packing copy and the kernel's tiles; the add is in the tiles
        assert scripts[name].count("T.parallel(") == 2, name
    assert not any(re.search(r"T\.parallel\(T\.int64\(1\)\)", script) for script in scripts.values())


@pytest.mark.skipif(HOST_ISA is None, reason="this CPU has no dot-product kernel (VNNI, AVX2)")
def test_model_with_dot_kernels_gives_the_same_outputs(int8_tiny_cnn):
    imported, mod = int8_tiny_cnn
    x = np.random.default_rng(3).standard_normal(imported.inputs[0].shape).astype(np.float32)
    (with_kernels,) = run_local(mod, x)  # the host's kernels (VNNI or AVX2) are used
    vm = relax.VirtualMachine(relax.build(mod, X86_NO_AVX2), tvm.cpu())  # TVM's own int8 conv2d
    without = vm["main"](tvm.runtime.tensor(x)).numpy()
    np.testing.assert_array_equal(with_kernels, without)
