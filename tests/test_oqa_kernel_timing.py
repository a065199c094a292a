"""Workloads timed kernel by kernel, their input warm and everything else flushed, as inside a model."""

from __future__ import annotations

import platform

import numpy as np
import pytest
import tvm
from tvm import relax, tirx

from ohq_tvm import Precision, models
from ohq_tvm.codegen.module import build_executable, lower_for_board
from ohq_tvm.errors import OHQError
from ohq_tvm.frontend import load_onnx
from ohq_tvm.oqa import Workload, extract_workloads
from ohq_tvm.oqa.kernel_timing import build_kernel_library, kernel_library, time_kernels
from ohq_tvm.oqa.measure import MEASUREMENT_REVISION, schedule_label
from ohq_tvm.passes import AnnotateCandidates
from ohq_tvm.targets import resolve_target

HOST = resolve_target("host")


def _module(emit) -> tvm.IRModule:
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((4, 64), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(emit(bb, x))
        bb.emit_func_output(out)
    return bb.get()


def test_each_kernel_call_is_timed_with_the_activation_written_last_first():
    def two_matmuls(bb, x):
        a = bb.emit(relax.op.matmul(x, relax.const(np.ones((64, 32), "float32"))))
        # The constant comes first in the second call: its activation (a) must be moved before it.
        return relax.op.matmul(relax.const(np.ones((8, 4), "float32")), a)

    functions, calls = kernel_library(lower_for_board(_module(two_matmuls), HOST))
    assert [c.symbol for c in calls] == ["k0_matmul", "k1_matmul1"]
    assert calls[0].params == (((4, 64), "float32"), ((64, 32), "float32"), ((4, 32), "float32"))
    assert calls[1].params == (((4, 32), "float32"), ((8, 4), "float32"), ((8, 32), "float32"))
    for call in calls:
        function = functions[call.symbol]
        assert isinstance(function, tirx.PrimFunc) and function.attrs["global_symbol"] == call.symbol
        assert [tuple(int(d) for d in p.shape) for p in function.params] == [s for s, _ in call.params]


def test_a_module_without_kernels_has_nothing_to_time():
    with pytest.raises(OHQError, match="no kernel"):
        kernel_library(lower_for_board(_module(lambda bb, x: x), HOST))


def test_every_workload_of_a_model_reads_its_input_warm():
    imported = load_onnx(models.tiny_cnn())
    annotated = AnnotateCandidates([Precision.FP32, Precision.INT8], pin_first_last=False)(imported.mod)
    workloads = extract_workloads(annotated).unique()
    assert {w.kind for w in workloads} == {"layer", "quantize", "dequantize", "glue"}
    for workload in workloads:
        _, calls = kernel_library(lower_for_board(workload.module(), HOST))
        # Each operator is the kernels the model runs for it: one fused kernel, but for a padded int8
        # conv on a CPU without a dot-product kernel (whose kernel folds the padding in), a pad first.
        separate_pad = workload.op == "conv2d" and workload.precision.is_integer and HOST.dot_product is None
        expected = ["pad", "conv2d"] if separate_pad and len(calls) == 2 else [workload.op]
        assert len(calls) == len(expected), workload.label
        assert expected[0] != "pad" or calls[0].symbol.endswith("_pad"), workload.label
        assert calls[0].params[0] == (workload.input_shape, workload.input_dtype()), workload.label


def test_labels_name_the_measurement_revision():
    assert MEASUREMENT_REVISION >= 3  # r3: kernels timed cold (rows timed warm before stay apart)
    assert schedule_label("default") == f"default/r{MEASUREMENT_REVISION}"
    assert schedule_label("none") == f"none/r{MEASUREMENT_REVISION}"


@pytest.mark.skipif(
    platform.machine() not in {"x86_64", "AMD64", "aarch64", "arm64"},
    reason="TVM flushes caches only on x86-64 and AArch64",
)
def test_cold_timing_pays_for_weights_that_a_warm_loop_keeps_in_cache(loopback_board, tmp_path):
    # EfficientNet-Lite0's classifier: 5 MB of weights, read once per inference inside the model.
    workload = Workload(
        "layer", "dense", Precision.FP32, (1, 1280), (1, 1000), weight_shape=(1280, 1000), bias=True
    )
    calls = build_kernel_library(lower_for_board(workload.module(), HOST), HOST, tmp_path / "k.so")
    build_executable(workload.module(), HOST).export_library(str(tmp_path / "vm.so"))
    ratios = []
    for _ in range(2):  # interleaved, so that load from elsewhere hits both alike
        cold, _ = time_kernels(loopback_board.connect(), tmp_path / "k.so", calls, repeat=3, min_repeat_ms=20)
        vm = loopback_board.connect().load_vm(tmp_path / "vm.so")
        warm = vm.time(workload.synthetic_inputs(), repeat=3, min_repeat_ms=20)
        del vm
        ratios.append(cold.median_ms / warm.median_ms)
    # Measured 1.55-1.6x on a 2-core Zen 5 host (the model itself runs this kernel 1.6x slower than a
    # loop), 7.5-8.4x on a 2-core Zen 2 one with less cache per core: always well above 1.
    assert 1.2 < max(ratios) < 20.0, ratios
