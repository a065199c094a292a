"""Input statistics a CNN was trained on, recovered from the BatchNormalization after its first conv.

A BN's running mean and variance are the statistics of the conv output on real data. For an input whose
pixels are independent with per-channel mean ``mu_c`` and variance ``s_c``, the conv output channel ``o``
has ``E[y_o] = b_o + sum_c mu_c * sum(W[o, c])`` and ``Var[y_o] = sum_c s_c * sum(W[o, c]^2)``: linear in
``mu`` and ``s``, with one equation per output channel. Least squares (non-negative for the variances)
gives the input distribution whose first-layer statistics match training best, and synthetic calibration
data drawn from it lands in the ranges real data would.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from .errors import OHQError


def matched_input_statistics(model: onnx.ModelProto) -> tuple[str, np.ndarray, np.ndarray]:
    """``(input name, mean[C], std[C])`` matching the first conv's BatchNormalization statistics.

    Raises :class:`OHQError` when no graph input feeds a Conv followed by a BatchNormalization with
    initializer parameters (e.g. BN already folded, or preprocessing ops before the conv).
    """
    from scipy.optimize import nnls  # ~0.5 s to import: loaded when matched data is made

    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    inputs = {i.name for i in graph.input} - set(initializers)
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    for node in graph.node:
        if node.op_type != "Conv" or node.input[0] not in inputs or node.input[1] not in initializers:
            continue
        following = readers.get(node.output[0], [])
        if len(following) != 1 or following[0].op_type != "BatchNormalization":
            continue
        bn = following[0]
        if not all(name in initializers for name in bn.input[1:5]):
            continue
        groups = next((a.i for a in node.attribute if a.name == "group"), 1)
        if groups != 1:
            continue
        weight = numpy_helper.to_array(initializers[node.input[1]]).astype(np.float64)
        bias = (
            numpy_helper.to_array(initializers[node.input[2]]).astype(np.float64)
            if len(node.input) > 2 and node.input[2]
            else np.zeros(weight.shape[0])
        )
        mean = numpy_helper.to_array(initializers[bn.input[3]]).astype(np.float64)
        var = numpy_helper.to_array(initializers[bn.input[4]]).astype(np.float64)
        sums = weight.sum(axis=(2, 3))  # [O, C]
        squares = (weight**2).sum(axis=(2, 3))
        mu, *_ = np.linalg.lstsq(sums, mean - bias, rcond=None)
        variances, _ = nnls(squares, var)
        return node.input[0], mu.astype(np.float32), np.sqrt(np.maximum(variances, 1e-6)).astype(np.float32)
    raise OHQError(
        "no Conv → BatchNormalization reads a model input directly, so there are no training statistics "
        "to match; use gaussian synthetic data or your own samples"
    )
