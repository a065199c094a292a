"""Dot-product int8 kernels: bit-exact against an integer reference, the instructions really emitted, and
the Relax rewrite that puts them into a quantized model."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax, te
from tvm.relax.backend.cpu_generic import pipeline as cpu_generic

from ohq_tvm import models
from ohq_tvm.build.schedules import CPUDefaultRule
from ohq_tvm.calibration import calibrate
from ohq_tvm.frontend import load_onnx
from ohq_tvm.kernels import (
    AVX512_VNNI,
    AVX_VNNI,
    SDOT,
    conv2d_dot,
    conv2d_dot_pixels,
    dense_dot,
    depthwise_conv2d_planes,
    dot_product_isa,
    has_dot_kernel,
    pack_conv2d_weight,
    pack_conv2d_weight_pixels,
    pack_dense_weight,
    pixel_lanes,
    schedule_default,
    usable_isas,
)
from ohq_tvm.layers import quantizable_layers
from ohq_tvm.passes import ApplyPlan, UseCPUKernels
from ohq_tvm.plan import Plan

from testing_support import conv2d_int_reference, host_target, run_local

X86_VNNI = tvm.target.Target({"kind": "llvm", "mcpu": "znver4", "num-cores": 2})
X86_AVX_VNNI = tvm.target.Target({"kind": "llvm", "mcpu": "alderlake"})
X86_NO_VNNI = tvm.target.Target({"kind": "llvm", "mcpu": "skylake"})
ARM_DOTPROD = tvm.target.Target(
    {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon", "+dotprod"]}
)
ARM_NEON = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]})

HOST_ISA = dot_product_isa(host_target())
needs_vnni = pytest.mark.skipif(
    HOST_ISA is None or HOST_ISA.name != "avx512_vnni", reason="this CPU has no AVX-512 VNNI"
)


def test_isa_detection_from_the_target():
    assert dot_product_isa(X86_VNNI) is AVX512_VNNI
    assert dot_product_isa(X86_AVX_VNNI) is AVX_VNNI
    assert dot_product_isa(X86_NO_VNNI) is None
    assert dot_product_isa(ARM_DOTPROD) is SDOT
    assert dot_product_isa(ARM_NEON) is None


def _conv_func(isa, shape, out_c, kernel, stride, pad, dilation, pad_value, pixels=False):
    data = te.placeholder(shape, "uint8", "data")
    blocks_in = -(-shape[1] // 4)
    if pixels:
        packed_shape = (out_c, blocks_in, kernel, kernel, 4)
    else:
        packed_shape = (-(-out_c // isa.lanes), blocks_in, kernel, kernel, isa.lanes, 4)
    packed = te.placeholder(packed_shape, "int8", "packed")
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


def _conv_case(isa, shape, out_c, kernel, stride, pad, dilation, pad_value, pixels=False, seed=0):
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


def _run(func, target, arrays, out_shape):
    lib = tvm.compile(tvm.IRModule({"main": func}), target=target)
    out = tvm.runtime.empty(out_shape, "int32", tvm.cpu())
    lib.mod["main"](*[tvm.runtime.tensor(a) for a in arrays], out)
    return lib, out.numpy()


CONV_CASES = [
    # shape, out_c, kernel, stride, pad, dilation, pad_value
    ((1, 64, 14, 14), 64, 3, 1, 1, 1, 7),
    ((1, 3, 17, 17), 32, 3, 2, 1, 1, 0),  # the stem: 3 input channels, odd size
    ((1, 24, 12, 12), 144, 1, 1, 0, 1, 0),  # 1x1
    ((2, 19, 9, 9), 21, 3, 2, 1, 1, 200),  # batch 2, channels not multiples of 4 or 16
    ((1, 8, 11, 11), 16, 3, 1, 2, 2, 3),  # dilation 2
]


@needs_vnni
@pytest.mark.parametrize("isa", [AVX512_VNNI, AVX_VNNI], ids=lambda i: i.name)
@pytest.mark.parametrize(
    "case", CONV_CASES, ids=lambda c: "x".join(map(str, c[0])) + f"-o{c[1]}k{c[2]}s{c[3]}"
)
def test_conv2d_kernel_is_bit_exact(isa, case):
    data, packed, bias, expected = _conv_case(isa, *case)
    func = _conv_func(isa, *case)
    assert has_dot_kernel(func)
    sch = schedule_default(func)
    lib, out = _run(sch.mod["main"], X86_VNNI, [data, packed, bias], expected.shape)
    np.testing.assert_array_equal(out, expected)
    assert "vpdpbusd" in lib.mod.inspect_source("asm")


PIXEL_CASES = [
    # shape, out_c, kernel, stride, pad, dilation, pad_value: stride 1, output rows a multiple of 16
    ((1, 16, 6, 32), 24, 1, 1, 0, 1, 0),  # 1x1, output channels not a multiple of the lanes
    ((1, 19, 10, 16), 21, 3, 1, 1, 1, 200),  # 3x3, input channels not a multiple of 4, padded
    ((2, 8, 9, 32), 16, 3, 1, 2, 2, 3),  # batch 2, dilation 2
]


@needs_vnni
@pytest.mark.parametrize("isa", [AVX512_VNNI, AVX_VNNI], ids=lambda i: i.name)
@pytest.mark.parametrize(
    "case", PIXEL_CASES, ids=lambda c: "x".join(map(str, c[0])) + f"-o{c[1]}k{c[2]}d{c[5]}"
)
def test_pixel_conv2d_kernel_is_bit_exact(isa, case):
    data, packed, bias, expected = _conv_case(isa, *case, pixels=True)
    func = _conv_func(isa, *case, pixels=True)
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
    assert usable_isas(X86_NO_VNNI) == []
    assert pixel_lanes(28, (1, 1), usable_isas(ARM_DOTPROD)) is SDOT


def test_sdot_arithmetic_is_exact_before_tensorization():
    """The sdot form (activations shifted to int8, 128·Σw added back) computes the same integers; run
    unscheduled on this machine, since an aarch64 board is not at hand in the tests."""
    case = ((1, 19, 9, 9), 21, 3, 2, 1, 1, 200)
    data, packed, bias, expected = _conv_case(SDOT, *case)
    _lib, out = _run(_conv_func(SDOT, *case), host_target(), [data, packed, bias], expected.shape)
    np.testing.assert_array_equal(out, expected)
    case = PIXEL_CASES[1]
    data, packed, bias, expected = _conv_case(SDOT, *case, pixels=True)
    func = _conv_func(SDOT, *case, pixels=True)
    _lib, out = _run(func, host_target(), [data, packed, bias], expected.shape)
    np.testing.assert_array_equal(out, expected)


def _asm(func, target) -> str:
    lib = tvm.compile(tvm.IRModule({"main": schedule_default(func).mod["main"]}), target=target)
    return lib.mod.inspect_source("asm")


def test_aarch64_dotprod_assembly_uses_sdot():
    asm = _asm(_conv_func(SDOT, (1, 32, 14, 14), 32, 3, 1, 1, 1, 0), ARM_DOTPROD)
    assert "sdot" in asm
    assert asm.count("sdot") >= 9  # one per kernel tap at least
    asm = _asm(_conv_func(SDOT, (1, 32, 14, 16), 32, 3, 1, 1, 1, 0, pixels=True), ARM_DOTPROD)
    assert asm.count("sdot") >= 9


def test_x86_assembly_uses_vpdpbusd_on_zmm_and_ymm():
    func = _conv_func(AVX512_VNNI, (1, 32, 14, 14), 32, 3, 1, 1, 1, 0)
    assert "vpdpbusd\t%zmm" in _asm(func, X86_VNNI)
    func = _conv_func(AVX_VNNI, (1, 32, 14, 14), 32, 3, 1, 1, 1, 0)
    assert "vpdpbusd\t%ymm" in _asm(func, X86_AVX_VNNI)


DENSE_CASES = [((1, 1280), 1000), ((3, 7), 5), ((2, 3, 8), 20)]


@needs_vnni
@pytest.mark.parametrize(("shape", "columns"), DENSE_CASES, ids=lambda v: str(v))
def test_dense_kernel_is_bit_exact(shape, columns):
    rng = np.random.default_rng(1)
    data = rng.integers(0, 256, shape, dtype=np.uint8)
    weight = rng.integers(-128, 128, (shape[-1], columns), dtype=np.int8)
    bias = rng.integers(-5000, 5000, columns).astype(np.int32)
    packed, correction = pack_dense_weight(weight, AVX512_VNNI)
    x = te.placeholder(shape, "uint8", "x")
    w = te.placeholder(packed.shape, "int8", "w")
    b = te.placeholder((columns,), "int32", "b")
    func = te.create_prim_func([x, w, b, dense_dot(x, w, b, isa_name="avx512_vnni", columns=columns)])
    expected = data.astype(np.int64) @ weight.astype(np.int64) + bias
    lib, out = _run(
        schedule_default(func).mod["main"],
        X86_VNNI,
        [data, packed, (bias + correction).astype(np.int32)],
        expected.shape,
    )
    np.testing.assert_array_equal(out, expected)
    assert "vpdpbusd" in lib.mod.inspect_source("asm")


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
    # Without a dot-product instruction only the depthwise convs change.
    plain = UseCPUKernels(X86_NO_VNNI)(mod)
    assert _dot_funcs(plain) == [] and len(_funcs(plain, "depthwise_conv2d_int8")) == 2
    assert _ops(plain, "relax.nn.conv2d") == 4
    gpu = tvm.target.Target({"kind": "cuda"})
    assert UseCPUKernels(gpu)(mod).same_as(mod)


def _ops(mod, name):
    calls = [b.value for blk in mod["main"].body.blocks for b in blk.bindings]
    return sum(isinstance(c, relax.Call) and c.op == tvm.ir.Op.get(name) for c in calls)


def _funcs(mod, prefix):
    return [gv.name_hint for gv, _f in mod.functions_items() if gv.name_hint.startswith(prefix)]


def _depthwise_reference(data, weight, strides, padding, dilation, pad_value):
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
    expected = _depthwise_reference(data, weight, strides, padding, dilation, pad_value)
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


@needs_vnni
def test_model_with_dot_kernels_gives_the_same_outputs(int8_tiny_cnn):
    imported, mod = int8_tiny_cnn
    x = np.random.default_rng(3).standard_normal(imported.inputs[0].shape).astype(np.float32)
    (with_kernels,) = run_local(mod, x)  # the host has VNNI: the kernels are used
    vm = relax.VirtualMachine(relax.build(mod, X86_NO_VNNI), tvm.cpu())  # TVM's own int8 conv2d
    without = vm["main"](tvm.runtime.tensor(x)).numpy()
    np.testing.assert_array_equal(with_kernels, without)
