"""Distilled synthetic data: BN targets, the loss and its gradient against references, the optimisation."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tvm
from onnx import numpy_helper
from tvm import relax

from ohq_tvm import Precision, models
from ohq_tvm.calibration import resolve_synthetic, synthetic_batches, synthetic_data
from ohq_tvm.codegen.module import build_executable
from ohq_tvm.distill import channel_targets, distilled_batches, statistics_loss, statistics_loss_module
from ohq_tvm.errors import OHQError
from ohq_tvm.frontend import load_onnx
from ohq_tvm.mqe import estimate_sensitivity
from ohq_tvm.targets import resolve_target

from testing_support import assert_input_gradient_is_right


@pytest.fixture(scope="module")
def tiny():
    return load_onnx(models.tiny_cnn())


def _bn_outputs(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    """The outputs of every BatchNormalization, by ONNX Runtime on the unfolded model."""
    probed = onnx.ModelProto()
    probed.CopyFrom(model)
    names = [n.output[0] for n in probed.graph.node if n.op_type == "BatchNormalization"]
    for name in names:
        probed.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(probed.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(names, {"input": x})


def test_targets_are_the_bn_shift_and_scale(tiny):
    targets = channel_targets(tiny)
    assert [t.layer_id for t in targets] == ["stem_conv", "dw1"]
    params = {i.name: numpy_helper.to_array(i) for i in tiny.onnx_model.graph.initializer}
    bns = [n for n in tiny.onnx_model.graph.node if n.op_type == "BatchNormalization"]
    for target, bn in zip(targets, bns, strict=True):
        np.testing.assert_array_equal(target.mean, params[bn.input[2]])
        np.testing.assert_array_equal(target.std, np.abs(params[bn.input[1]]))


def _with_unfoldable_bns(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with a second (unused) reader of every BN's conv output: the import cannot fold those
    BNs, they stay ``batch_norm`` operators behind their convs."""
    kept = onnx.ModelProto()
    kept.CopyFrom(model)
    for node in [n for n in kept.graph.node if n.op_type == "BatchNormalization"]:
        unused = f"{node.name}.unused"
        reader = onnx.helper.make_node("Relu", [node.input[0]], [unused], name=f"{node.name}.reader")
        kept.graph.node.append(reader)
    return kept


@pytest.mark.parametrize("folded", [True, False], ids=["bn-folded", "bn-kept"])
def test_loss_equals_the_statistics_of_onnx_runtime_bn_outputs(tiny, folded):
    imported = tiny if folded else load_onnx(_with_unfoldable_bns(models.tiny_cnn()))
    kept = [c for c in imported.mod["main"].script().splitlines() if "R.nn.batch_norm" in c]
    assert len(kept) == (0 if folded else 2)
    x = np.random.default_rng(3).standard_normal((1, 3, 32, 32)).astype(np.float32)
    expected = 0.0
    for output, target in zip(_bn_outputs(imported.onnx_model, x), channel_targets(imported), strict=True):
        out = output.astype(np.float64)
        mean = out.mean(axis=(0, 2, 3))
        std = np.sqrt(out.var(axis=(0, 2, 3)) + 1e-5)
        squares = ((mean - target.mean) ** 2).sum() + ((std - target.std) ** 2).sum()
        expected += squares / (target.std.astype(np.float64) ** 2).sum()
    assert expected > 0.05  # noise is far from the trained statistics
    assert statistics_loss(imported, {"input": x}) == pytest.approx(expected, rel=1e-4)


def test_gradient_matches_finite_differences(tiny):
    mod = statistics_loss_module(tiny, channel_targets(tiny))
    vm = relax.VirtualMachine(build_executable(mod, resolve_target("host")), tvm.cpu())
    x = np.random.default_rng(8).standard_normal((1, 3, 32, 32))
    assert_input_gradient_is_right(vm, x)


def test_distillation_brings_the_statistics_close_and_is_deterministic(tiny):
    steps = []
    batches = distilled_batches(tiny, 2, iterations=60, seed=4, progress=lambda d, t: steps.append((d, t)))
    assert steps[-1] == (120, 120) and len(steps) == 120
    noise = synthetic_batches(tiny.inputs, 2, "gaussian", seed=4)
    for distilled, start in zip(batches, noise, strict=True):
        assert distilled["input"].shape == (1, 3, 32, 32) and distilled["input"].dtype == np.float32
        assert statistics_loss(tiny, distilled) < 0.2 * statistics_loss(tiny, start)
    again = distilled_batches(tiny, 2, iterations=60, seed=4)
    np.testing.assert_array_equal(again[1]["input"], batches[1]["input"])


def test_auto_picks_distilled_only_with_bn_statistics(tiny):
    plain = load_onnx(models.conv_model())
    assert resolve_synthetic(tiny, "auto") == "distilled"
    assert resolve_synthetic(plain, "auto") == "gaussian"
    assert resolve_synthetic(plain, "uniform") == "uniform"
    with pytest.raises(OHQError, match="unknown synthetic data 'noise'; use one of auto, gaussian"):
        resolve_synthetic(plain, "noise")
    with pytest.raises(OHQError, match="BatchNormalization statistics, and the model has none"):
        synthetic_data(plain, 1, "distilled")
    with pytest.raises(OHQError, match="synthetic_data"):
        synthetic_batches(tiny.inputs, 1, "distilled")


def test_auto_falls_back_to_gaussian_without_gradients():
    g = models._Graph(0)
    x = g.node("LeakyRelu", [g.batchnorm(g.conv("input", 3, 8, name="first"), 8)], alpha=0.1)
    x = g.batchnorm(g.conv(x, 8, 8, name="second"), 8)
    imported = load_onnx(g.model("leaky", {"input": [1, 3, 16, 16]}, x))
    assert len(channel_targets(imported)) == 2
    assert resolve_synthetic(imported, "auto") == "gaussian"
    with pytest.raises(OHQError, match=r"gradient of every operator.*use gaussian"):
        synthetic_data(imported, 1, "distilled")


def test_mqe_on_distilled_data(tiny):
    result = estimate_sensitivity(tiny, [Precision.INT8], num_batches=1, synthetic="auto")
    assert result.data == "synthetic:distilled"
    assert result.forward_passes == 1 + 7
    assert all(row[Precision.INT8] > 0 for row in result.values.values())
