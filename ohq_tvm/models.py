"""Small generated ONNX models (no torch, deterministic weights) for the demo, tests and benchmarks.

Weights are He-initialised from a seed so activations stay of order one through the network.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper, shape_inference

from .jsonfile import write_atomic

OPSET = 17


class _Graph:
    """Accumulates nodes and initializers; each helper returns the name of its output tensor."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.count = 0

    def _name(self, kind: str) -> str:
        self.count += 1
        return f"{kind}{self.count}"

    def const(self, name: str, value: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(value.astype(np.float32), name))
        return name

    def node(self, op: str, inputs: list[str], name: str | None = None, **attrs) -> str:
        name = name or self._name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [f"{name}_out"], name=name, **attrs))
        return f"{name}_out"

    def conv(
        self,
        x: str,
        cin: int,
        cout: int,
        k: int = 3,
        stride: int = 1,
        groups: int = 1,
        bias: bool = True,
        name: str | None = None,
    ) -> str:
        name = name or self._name("conv")
        fan_in = (cin // groups) * k * k
        w = self.rng.standard_normal((cout, cin // groups, k, k)) * np.sqrt(2.0 / fan_in)
        inputs = [x, self.const(f"{name}.weight", w)]
        if bias:
            inputs.append(self.const(f"{name}.bias", self.rng.standard_normal(cout) * 0.1))
        pad = k // 2
        return self.node(
            "Conv", inputs, name, kernel_shape=[k, k], strides=[stride, stride], pads=[pad] * 4, group=groups
        )

    def batchnorm(self, x: str, channels: int) -> str:
        name = self._name("bn")
        params = [
            self.const(f"{name}.scale", 1.0 + 0.1 * self.rng.standard_normal(channels)),
            self.const(f"{name}.bias", 0.1 * self.rng.standard_normal(channels)),
            self.const(f"{name}.mean", 0.1 * self.rng.standard_normal(channels)),
            self.const(f"{name}.var", 1.0 + 0.1 * np.abs(self.rng.standard_normal(channels))),
        ]
        return self.node("BatchNormalization", [x, *params], name, epsilon=1e-5)

    def relu6(self, x: str) -> str:
        zero = self.const(self._name("zero"), np.array(0.0))
        six = self.const(self._name("six"), np.array(6.0))
        return self.node("Clip", [x, zero, six])

    def inverted_residual(
        self, x: str, cin: int, cout: int, expansion: int, k: int, stride: int, prefix: str
    ) -> str:
        """MobileNetV2's block: 1x1 expand (unless ``expansion`` is 1), kxk depthwise, 1x1 project, and
        the residual add when the shapes allow it."""
        hidden = cin * expansion
        y = x
        if expansion != 1:
            y = self.relu6(self.conv(y, cin, hidden, k=1, name=f"{prefix}_expand"))
        y = self.relu6(self.conv(y, hidden, hidden, k=k, stride=stride, groups=hidden, name=f"{prefix}_dw"))
        y = self.conv(y, hidden, cout, k=1, name=f"{prefix}_project")
        return self.node("Add", [x, y], f"{prefix}_add") if stride == 1 and cin == cout else y

    def gemm(self, x: str, cin: int, cout: int, name: str | None = None) -> str:
        name = name or self._name("fc")
        w = self.rng.standard_normal((cout, cin)) * np.sqrt(2.0 / cin)
        b = self.rng.standard_normal(cout) * 0.1
        return self.node(
            "Gemm", [x, self.const(f"{name}.weight", w), self.const(f"{name}.bias", b)], name, transB=1
        )

    def model(
        self, graph_name: str, inputs: dict[str, list[int]], output: str, output_name: str = "output"
    ) -> onnx.ModelProto:
        self.nodes.append(helper.make_node("Identity", [output], [output_name], name="output_identity"))
        graph = helper.make_graph(
            self.nodes,
            graph_name,
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs.items()],
            [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, None)],
            self.initializers,
        )
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="ohq-tvm"
        )
        model.ir_version = 8
        # Declare the output's shape from ONNX shape inference, so the model is fully typed.
        inferred = shape_inference.infer_shapes(model)
        known = {vi.name: vi.type for vi in inferred.graph.value_info}
        model.graph.output[0].type.CopyFrom(known[output])
        onnx.checker.check_model(model, full_check=True)
        return model


def conv_model(channels: int = 16, size: int = 16, seed: int = 0) -> onnx.ModelProto:
    """3x3 conv (3 → ``channels``) + bias + Relu, input ``input`` [1, 3, size, size]."""
    g = _Graph(seed)
    y = g.node("Relu", [g.conv("input", 3, channels, name="conv0")], "relu0")
    return g.model("conv", {"input": [1, 3, size, size]}, y)


def pointwise_conv_model(
    in_channels: int = 16, out_channels: int = 24, size: int = 14, stride: int = 1, seed: int = 0
) -> onnx.ModelProto:
    """1x1 conv (``in_channels`` → ``out_channels``, ``stride``) + bias + Relu, as in MobileNet blocks."""
    g = _Graph(seed)
    y = g.node("Relu", [g.conv("input", in_channels, out_channels, k=1, stride=stride, name="pw0")], "relu0")
    return g.model("pointwise_conv", {"input": [1, in_channels, size, size]}, y)


def depthwise_conv_model(channels: int = 16, size: int = 16, seed: int = 0) -> onnx.ModelProto:
    """Depthwise 3x3 conv (group = channels) + Relu."""
    g = _Graph(seed)
    y = g.node("Relu", [g.conv("input", channels, channels, groups=channels, name="dwconv0")], "relu0")
    return g.model("depthwise_conv", {"input": [1, channels, size, size]}, y)


def gemm_model(features: int = 64, classes: int = 32, seed: int = 0) -> onnx.ModelProto:
    """Gemm with transB=1 and bias: [1, features] → [1, classes]."""
    g = _Graph(seed)
    return g.model("gemm", {"input": [1, features]}, g.gemm("input", features, classes, name="fc0"))


def matmul_model(rows: int = 4, features: int = 64, out_features: int = 48, seed: int = 0) -> onnx.ModelProto:
    """MatMul with a constant [features, out_features] weight, then Add of a bias."""
    g = _Graph(seed)
    w = g.const("matmul0.weight", g.rng.standard_normal((features, out_features)) * np.sqrt(2.0 / features))
    b = g.const("matmul0.bias", g.rng.standard_normal(out_features) * 0.1)
    y = g.node("Add", [g.node("MatMul", ["input", w], "matmul0"), b], "bias0")
    return g.model("matmul", {"input": [rows, features]}, y)


def residual_model(channels: int = 16, size: int = 16, seed: int = 0) -> onnx.ModelProto:
    """conv → relu → conv, plus the skip connection: Add(input, branch) → Relu."""
    g = _Graph(seed)
    branch = g.node("Relu", [g.conv("input", channels, channels, name="conv0")], "relu0")
    branch = g.conv(branch, channels, channels, name="conv1")
    y = g.node("Relu", [g.node("Add", ["input", branch], "add0")], "relu1")
    return g.model("residual", {"input": [1, channels, size, size]}, y)


def pooling_model(channels: int = 8, size: int = 16, seed: int = 0) -> onnx.ModelProto:
    """MaxPool 2x2, AveragePool 3x3 (padded), GlobalAveragePool, flattened."""
    g = _Graph(seed)
    y = g.node("MaxPool", ["input"], "maxpool0", kernel_shape=[2, 2], strides=[2, 2])
    y = g.node(
        "AveragePool",
        [y],
        "avgpool0",
        kernel_shape=[3, 3],
        strides=[1, 1],
        pads=[1, 1, 1, 1],
        count_include_pad=0,
    )
    y = g.node("Flatten", [g.node("GlobalAveragePool", [y], "gap0")], "flatten0")
    return g.model("pooling", {"input": [1, channels, size, size]}, y)


def tiny_cnn(seed: int = 0, size: int = 32, classes: int = 10) -> onnx.ModelProto:
    """A MobileNetV2-shaped network small enough to build in seconds (input ``input`` [1, 3, 32, 32]).

    stem conv 3x3 s2 + BN + Relu → depthwise 3x3 + BN + Relu → pointwise 1x1 → inverted residual
    (expand 1x1, depthwise 3x3, project 1x1, skip Add) → GlobalAveragePool → Flatten → Gemm.
    """
    g = _Graph(seed)
    x = g.node("Relu", [g.batchnorm(g.conv("input", 3, 16, stride=2, bias=False, name="stem_conv"), 16)])
    x = g.node("Relu", [g.batchnorm(g.conv(x, 16, 16, groups=16, bias=False, name="dw1"), 16)])
    x = g.conv(x, 16, 24, k=1, name="pw1")
    skip = x
    y = g.node("Relu", [g.conv(x, 24, 72, k=1, name="expand2")])
    y = g.node("Relu", [g.conv(y, 72, 72, groups=72, name="dw2")])
    y = g.conv(y, 72, 24, k=1, name="project2")
    x = g.node("Add", [skip, y], "residual2")
    x = g.node("Flatten", [g.node("GlobalAveragePool", [x], "gap")], "flatten")
    return g.model("tiny_cnn", {"input": [1, 3, size, size]}, g.gemm(x, 24, classes, name="classifier"))


# (expansion t, output channels c, repeats n, first stride s) of MobileNetV2's inverted residual stages.
MOBILENET_V2_STAGES = [
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
]


def mobilenet_v2(size: int = 224, classes: int = 1000, width: float = 1.0, seed: int = 0) -> onnx.ModelProto:
    """MobileNetV2's architecture (BN folded into conv biases, ReLU6 as Clip) with random weights.

    For latency work: the layer shapes are the real network's, the weights are not trained.
    """
    g = _Graph(seed)

    def channels(c: int) -> int:
        return max(8, int(c * width + 4) // 8 * 8)

    cin = channels(32)
    x = g.relu6(g.conv("input", 3, cin, stride=2, name="features_0_conv"))
    block = 1
    for t, c, n, first_stride in MOBILENET_V2_STAGES:
        cout = channels(c)
        for i in range(n):
            stride = first_stride if i == 0 else 1
            x = g.inverted_residual(x, cin, cout, t, 3, stride, f"features_{block}")
            cin = cout
            block += 1
    last = channels(1280) if width > 1.0 else 1280
    x = g.relu6(g.conv(x, cin, last, k=1, name=f"features_{block}_conv"))
    x = g.node("Flatten", [g.node("GlobalAveragePool", [x], "pool")], "flatten")
    return g.model("mobilenet_v2", {"input": [1, 3, size, size]}, g.gemm(x, last, classes, name="classifier"))


# EfficientNet-Lite0 stages: (expansion, kernel, output channels, repeats, first stride).
_EFFICIENTNET_LITE0_STAGES = [
    (1, 3, 16, 1, 1),
    (6, 3, 24, 2, 2),
    (6, 5, 40, 2, 2),
    (6, 3, 80, 3, 2),
    (6, 5, 112, 3, 1),
    (6, 5, 192, 4, 2),
    (6, 3, 320, 1, 1),
]


def efficientnet_lite0(size: int = 224, classes: int = 1000, seed: int = 0) -> onnx.ModelProto:
    """EfficientNet-Lite0's architecture (no squeeze-excite, ReLU6, BN folded) with random weights.

    For latency work, like :func:`mobilenet_v2`: real layer shapes (3x3 and 5x5 depthwise), untrained weights.
    """
    g = _Graph(seed)

    cin = 32
    x = g.relu6(g.conv("input", 3, cin, stride=2, name="stem"))
    block = 0
    for t, k, cout, n, first_stride in _EFFICIENTNET_LITE0_STAGES:
        for i in range(n):
            x = g.inverted_residual(x, cin, cout, t, k, first_stride if i == 0 else 1, f"blocks_{block}")
            cin = cout
            block += 1
    x = g.relu6(g.conv(x, cin, 1280, k=1, name="head"))
    x = g.node("Flatten", [g.node("GlobalAveragePool", [x], "pool")], "flatten")
    return g.model("efficientnet_lite0", {"input": [1, 3, size, size]}, g.gemm(x, 1280, classes, name="fc"))


MODELS: dict[str, Callable[[], onnx.ModelProto]] = {
    "conv": conv_model,
    "depthwise_conv": depthwise_conv_model,
    "gemm": gemm_model,
    "matmul": matmul_model,
    "residual": residual_model,
    "pooling": pooling_model,
    "tiny_cnn": tiny_cnn,
    "mobilenet_v2": mobilenet_v2,
    "efficientnet_lite0": efficientnet_lite0,
}


def save(model: onnx.ModelProto, path: str | os.PathLike) -> Path:
    """Write ``model`` to ``path`` atomically (see :func:`~ohq_tvm.jsonfile.write_atomic`), creating
    parent folders; :class:`~ohq_tvm.errors.OHQError` naming the path when it cannot be written."""
    return write_atomic(path, model.SerializeToString(), "ONNX model")
