"""Inverted synthetic data: the loss and its gradient against references, the optimisation, auto's choice."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import tvm
from onnx import numpy_helper
from tvm import relax

from ohq_tvm import Precision, models
from ohq_tvm.calibration import resolve_synthetic, synthetic_batches, synthetic_data
from ohq_tvm.codegen.module import build_executable
from ohq_tvm.errors import OHQError
from ohq_tvm.frontend import load_onnx
from ohq_tvm.invert import (
    L2_WEIGHT,
    TV_WEIGHT,
    class_count,
    inversion_loss,
    inversion_loss_module,
    inverted_batches,
    invertible,
    target_classes,
)
from ohq_tvm.mqe import estimate_sensitivity
from ohq_tvm.targets import resolve_target

from testing_support import assert_input_gradient_is_right


def plain_classifier(batch: int = 1, classes: int = 10):
    """A classifier without BatchNormalization (as the MNIST CNN): conv, relu, max-pool, conv, relu,
    global pool, dense; the dense weights scaled up, so that, as in a trained network, some input makes
    each class certain."""
    g = models._Graph(5)
    x = g.node("Relu", [g.conv("input", 3, 8, stride=2, name="conv0")])
    x = g.node("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2])
    x = g.node("Relu", [g.conv(x, 8, 16, name="conv1")])
    x = g.node("Flatten", [g.node("GlobalAveragePool", [x])])
    logits = g.gemm(x, 16, classes, name="fc")
    (weight,) = [i for i in g.initializers if i.name == "fc.weight"]
    weight.CopyFrom(numpy_helper.from_array(8 * numpy_helper.to_array(weight), "fc.weight"))
    return g.model("plain", {"input": [batch, 3, 16, 16]}, logits)


@pytest.fixture(scope="module")
def plain():
    return load_onnx(plain_classifier())


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def test_loss_is_cross_entropy_of_onnx_runtime_logits_plus_the_priors(plain):
    x = np.random.default_rng(3).standard_normal((1, 3, 16, 16))
    session = ort.InferenceSession(plain.onnx_model.SerializeToString(), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"input": x.astype(np.float32)})
    for label in (0, 7):
        cross_entropy = -_log_softmax(logits.astype(np.float64))[0, label]
        smooth = np.mean(np.diff(x, axis=3) ** 2) + np.mean(np.diff(x, axis=2) ** 2)
        expected = cross_entropy + TV_WEIGHT * smooth + L2_WEIGHT * np.mean(x**2)
        got = inversion_loss(plain, {"input": x.astype(np.float32)}, np.array([label]))
        assert got == pytest.approx(expected, rel=1e-5)


def test_gradient_matches_finite_differences(plain):
    vm = relax.VirtualMachine(
        build_executable(inversion_loss_module(plain), resolve_target("host")), tvm.cpu()
    )
    x = np.random.default_rng(8).standard_normal((1, 3, 16, 16))
    onehot = tvm.runtime.tensor(np.eye(10, dtype=np.float32)[[4]])
    assert_input_gradient_is_right(vm, x, onehot)


def test_inverted_inputs_are_classified_as_their_class():
    model = plain_classifier(classes=4)
    imported = load_onnx(model)
    steps = []
    batches = inverted_batches(imported, 8, iterations=60, seed=2, progress=lambda d, t: steps.append((d, t)))
    assert steps[-1] == (480, 480) and len(steps) == 480
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    noise = synthetic_batches(imported.inputs, 8, "gaussian", seed=2)
    confidence = []
    for index, batch in enumerate(batches):
        assert batch["input"].shape == (1, 3, 16, 16) and batch["input"].dtype == np.float32
        label = index % 4  # every class, in turn
        (logits,) = session.run(None, batch)
        probabilities = np.exp(_log_softmax(logits.astype(np.float64)))[0]
        assert probabilities.argmax() == label and probabilities[label] > 0.5
        confidence.append(probabilities[label])
    assert np.mean(confidence) > 0.85
    # Noise, the starting point, leaves classes out.
    assert len({int(session.run(None, start)[0].argmax()) for start in noise}) < 4
    again = inverted_batches(imported, 2, iterations=60, seed=2)
    np.testing.assert_array_equal(again[1]["input"], batches[1]["input"])


def test_classes_cycle_over_inputs_and_batch_rows():
    wide = load_onnx(plain_classifier(batch=4, classes=3))
    assert class_count(wide) == 3
    assert [c.tolist() for c in target_classes(wide, 3)] == [[0, 1, 2, 0], [1, 2, 0, 1], [2, 0, 1, 2]]


def test_only_differentiable_classifiers_are_inverted(plain):
    assert resolve_synthetic(plain, "auto") == "inverted"
    assert resolve_synthetic(load_onnx(models.tiny_cnn()), "auto") == "distilled"  # BN statistics first
    feature_map = load_onnx(models.conv_model())  # a [1, 16, 16, 16] output: no classes to invert
    assert not invertible(feature_map) and resolve_synthetic(feature_map, "auto") == "gaussian"
    with pytest.raises(OHQError, match=r"classifier: one float32 output of shape \[batch, classes\]"):
        synthetic_data(feature_map, 1, "inverted")
    g = models._Graph(0)
    x = g.node("Flatten", [g.node("GlobalAveragePool", [g.node("LeakyRelu", [g.conv("input", 3, 8)])])])
    leaky = load_onnx(g.model("leaky", {"input": [1, 3, 8, 8]}, g.gemm(x, 8, 4)))
    assert class_count(leaky) == 4 and resolve_synthetic(leaky, "auto") == "gaussian"
    with pytest.raises(OHQError, match=r"gradient of every operator.*use gaussian"):
        synthetic_data(leaky, 1, "inverted")
    with pytest.raises(OHQError, match="synthetic_data"):
        synthetic_batches(plain.inputs, 1, "inverted")


def test_mqe_on_inverted_data(plain):
    result = estimate_sensitivity(plain, [Precision.INT8], num_batches=2, synthetic="auto")
    assert result.data == "synthetic:inverted"
    assert result.forward_passes == 2 * (1 + 3)
    assert all(value > 0 for row in result.values.values() for value in row.values())
