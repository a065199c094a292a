"""The zero-budget CPU schedule: nothing left naive, loops parallel and vectorised, outputs unchanged."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.relax.backend.cpu_generic import pipeline as cpu_pipeline

from ohq_tvm import models
from ohq_tvm.codegen import build_scheduled, default_cpu_schedule, unscheduled_functions
from ohq_tvm.codegen.conv_schedule import _depthwise_vector, regular_vector
from ohq_tvm.frontend import load_onnx, synthetic_inputs
from ohq_tvm.kernels.loops import REGISTER_TILE, vector_factor

from testing_support import every_model_slow_at_full_size, host_target


def legalized(model) -> tvm.IRModule:
    return legalized_module(load_onnx(model).mod)


def legalized_module(mod: tvm.IRModule) -> tvm.IRModule:
    target = host_target()
    with target:
        return tvm.transform.Sequential(cpu_pipeline.legalize_passes(target))(mod)


def scheduled(mod: tvm.IRModule) -> tvm.IRModule:
    with host_target():
        return default_cpu_schedule()(tvm.IRModule(dict(mod.functions_items())))


def prim_funcs(mod: tvm.IRModule) -> dict[str, tvm.tirx.PrimFunc]:
    return {gv.name_hint: f for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}


@pytest.mark.parametrize("name", ["tiny_cnn", "mobilenet_v2"])
def test_no_function_is_left_naive(name):
    before = legalized(models.MODELS[name]())
    assert unscheduled_functions(before)  # TVM's own pipeline schedules nothing
    after = scheduled(before)
    assert unscheduled_functions(after) == []
    funcs = prim_funcs(after)
    assert len(funcs) == len(prim_funcs(before))
    for fname, func in funcs.items():
        assert "T.parallel(" in func.script(), fname


def test_convolutions_are_vectorised_with_an_unrolled_channel_tile():
    funcs = prim_funcs(scheduled(legalized(models.mobilenet_v2(size=64))))
    convs = {name: f for name, f in funcs.items() if "conv2d" in name}
    assert convs
    for name, func in convs.items():
        out_width = int(func.params[-1].shape[-1])
        if out_width >= 4:  # a 2x2 map has no row to vectorise
            assert "T.vectorized(" in func.script(), name
    convs = {name: f.script() for name, f in convs.items()}
    # 1x1 convolutions over many channels get the register tile (unrolled output channels).
    assert sum("T.unroll(" in text for text in convs.values()) >= len(convs) // 2


@pytest.mark.parametrize("name", every_model_slow_at_full_size())
def test_outputs_equal_the_unscheduled_build(name):
    model = models.MODELS[name]() if name != "mobilenet_v2" else models.mobilenet_v2(size=64)
    assert_scheduled_equals_unscheduled(model, seed=2)


def assert_scheduled_equals_unscheduled(model, seed: int) -> None:
    imported = load_onnx(model)
    feeds = synthetic_inputs(imported.inputs, seed=seed)
    args = [tvm.runtime.tensor(feeds[s.name], tvm.cpu()) for s in imported.inputs]
    plain = relax.VirtualMachine(relax.build(imported.mod, host_target()), tvm.cpu())["main"](*args)
    fast = relax.VirtualMachine(build_scheduled(imported.mod, host_target()), tvm.cpu())["main"](*args)
    reference = plain.numpy()
    np.testing.assert_allclose(fast.numpy(), reference, rtol=1e-5, atol=1e-5 * float(np.abs(reference).max()))


@pytest.mark.parametrize(
    ("extent", "lanes", "factor"),
    [
        (112, 16, 16),
        (56, 16, 8),
        (28, 16, 4),
        (14, 16, 16),
        (7, 16, 8),
        (1000, 16, 8),
        (6, 4, 4),
        (3, 16, None),
        (None, 16, None),
    ],
)
def testvector_factor(extent, lanes, factor):
    assert vector_factor(extent, lanes) == factor


def test_depthwise_and_stem_convs_get_a_register_tile_with_the_epilogue_inside():
    funcs = prim_funcs(scheduled(legalized(models.mobilenet_v2(size=64))))
    tiled = {name: f.script() for name, f in funcs.items() if REGISTER_TILE in f.script()}
    # mobilenet_v2 has 17 depthwise convs (9 distinct functions here), 1x1 convs (16 distinct) and a
    # 3-channel stem: each keeps its accumulator in registers and computes the bias (+ ReLU6, + residual)
    # epilogue inside the conv's own parallel loop; only the stem has a second parallel stage, its padded
    # input (the 1x1 convs' empty pad is inlined, not copied).
    assert len(tiled) >= 25
    assert sorted(text.count("T.parallel(") for text in tiled.values())[:-1] == [1] * (len(tiled) - 1)
    (stem,) = [text for text in tiled.values() if text.count("T.parallel(") == 2]
    assert "pad_temp" in stem


@pytest.mark.parametrize(
    ("width", "lanes", "vector"),
    [
        (112, 16, 16),
        (56, 16, 8),
        (28, 16, 14),
        (14, 16, 14),
        (7, 16, 7),
        (7, 8, 7),
        (12, 16, 12),
        (12, 8, 4),
        (28, 8, 4),
        (14, 8, 2),
        (7, 4, None),
        (3, 16, None),
    ],
)
def test_regular_conv_vectors_divide_the_row(width, lanes, vector):
    assert regular_vector(width, lanes) == vector


@pytest.mark.parametrize(
    ("width", "lanes", "vector"),
    [(14, 8, 16), (7, 8, 8), (28, 8, 4), (56, 8, 8), (14, 16, 16), (112, 16, 16)],
)
def test_depthwise_rows_two_registers_cover_are_one_vector(width, lanes, vector):
    assert _depthwise_vector(width, lanes) == vector


@pytest.mark.parametrize(
    ("size", "stride", "flattened"), [(14, 1, True), (28, 1, True), (7, 1, False), (14, 2, False)]
)
def test_pointwise_convs_run_along_the_pixels(size, stride, flattened):
    # A 1x1 stride-1 conv reads its pixels in the order it writes them: rows and columns become one
    # pixel axis (196 = 49 vectors of 4 for 14x14, where a 14-wide row has no 4-lane vector), unless
    # no vector divides the pixels either (49 for 7x7: each 7-wide row stays one vector).
    model = models.pointwise_conv_model(in_channels=16, out_channels=24, size=size, stride=stride)
    (conv,) = [f.script() for n, f in prim_funcs(scheduled(legalized(model))).items() if "conv2d" in n]
    accumulator = f"T.int64(24), T.int64({size * size})))"
    assert (accumulator in conv) == flattened
    assert REGISTER_TILE in conv
    assert_scheduled_equals_unscheduled(model, seed=4)


@pytest.mark.parametrize(
    "model", [models.pointwise_conv_model(16, 24, size=14), models.conv_model(channels=16, size=14)]
)
def test_register_tiles_allocate_nothing_per_tile(model):
    # The accumulator tile is a stack array LLVM keeps in registers, not a workspace allocation (and
    # free) on every tile, as a ``local`` buffer had been.
    (conv,) = [f for n, f in prim_funcs(scheduled(legalized(model))).items() if "conv2d" in n]
    conv = conv.with_attr("global_symbol", "main")
    asm = tvm.compile(tvm.IRModule({"main": conv}), target=host_target()).mod.inspect_source("asm")
    bodies = [part.split(".Lfunc_end")[0] for part in asm.split(".L__tvm_parallel_lambda")[1:]]
    assert bodies and not any("AllocWorkspace" in body for body in bodies)


@pytest.mark.parametrize("size", [14, 7])
def test_regular_3x3_convs_with_odd_rows_get_the_register_tile(size):
    # ResNet's 3x3 convs at 14x14 and 7x7: rows no power-of-two vector divides.
    model = models.conv_model(channels=16, size=size)
    (conv,) = [f.script() for n, f in prim_funcs(scheduled(legalized(model))).items() if "conv2d" in n]
    assert REGISTER_TILE in conv and "T.vectorized(" in conv
    assert_scheduled_equals_unscheduled(model, seed=3)


def test_batch_statistics_and_scalar_results_build_and_match_numpy():
    """Per-channel mean/variance over (N, H, W) of a batch-1 tensor (four spatial axes and a reduction
    over a window, like a depthwise conv, but one tensor read: not a conv) fused with a scalar sum (a
    rank-0 result: no loop to spread) take the default schedule."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 8, 6, 6), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            mean = bb.emit(relax.op.mean(x, axis=[0, 2, 3]))
            spread = bb.emit(relax.op.sqrt(relax.op.variance(x, axis=[0, 2, 3])))
            total = bb.emit(relax.op.sum(relax.op.multiply(mean, spread)))
            out = bb.emit_output(total)
        bb.emit_func_output(out)
    target = host_target()
    executable = build_scheduled(bb.get(), target)
    data = np.random.default_rng(2).standard_normal((1, 8, 6, 6)).astype(np.float32)
    got = relax.VirtualMachine(executable, tvm.cpu())["main"](tvm.runtime.tensor(data)).numpy()
    expected = (data.mean(axis=(0, 2, 3)) * data.std(axis=(0, 2, 3))).sum()
    assert got.shape == () and float(got) == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.parametrize(("size", "flat"), [(14, True), (7, True), (28, False), (56, False)])
def test_element_wise_ops_over_planes_no_vector_divides_run_as_one_flat_loop(size, flat):
    # A dequantize-like chain over [1, 96, size, size]: 14x14 rows end in masked vectors, so the whole
    # tensor is one flat loop of full vectors; 28x28 keeps rows (4-lane vectors) and 56x56 full-width rows.
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 96, size, size), "uint8"))
    with bb.function("main", [x]):
        with bb.dataflow():
            shifted = bb.emit(relax.op.subtract(relax.op.astype(x, "float32"), relax.const(128.0)))
            out = bb.emit_output(relax.op.multiply(shifted, relax.const(0.05)))
        bb.emit_func_output(out)
    (func,) = prim_funcs(scheduled(legalized_module(bb.get()))).values()
    text = func.script()
    assert (f"T.parallel(T.int64({96 * size * size // 8}))" in text) == flat
    assert "T.vectorized(" in text and "T.where" not in text
    data = np.random.default_rng(5).integers(0, 256, (1, 96, size, size)).astype(np.uint8)
    executable = build_scheduled(bb.get(), host_target())
    got = relax.VirtualMachine(executable, tvm.cpu())["main"](tvm.runtime.tensor(data)).numpy()
    np.testing.assert_array_equal(got, (data.astype(np.float32) - 128.0) * np.float32(0.05))
