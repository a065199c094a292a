"""Fold inference-mode BatchNormalization into the Conv that feeds it, in the ONNX graph.

Done before import so that each conv's weight in Relax is exactly an ONNX initializer: layer ids are found
by matching weights to ONNX nodes, and quantization must see the weight the layer really multiplies by
(quantizing a conv and then scaling by a BN would quantize the wrong tensor). Relax's own
``FoldBatchnormToConv2D`` would do the arithmetic but drops the bindings that carry layer ids.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
from onnx import helper, numpy_helper


def fold_batch_norms(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """A copy of ``model`` with every foldable ``Conv → BatchNormalization`` pair merged; and how many.

    A pair folds when the BN is the conv's only reader, the conv output is not a graph output, the BN has
    one output (inference mode), and the conv weight, conv bias and all four BN parameters are
    initializers the conv/BN alone use. Anything else is left as it was.
    """
    folded = onnx.ModelProto()
    folded.CopyFrom(model)
    graph = folded.graph
    initializers = {init.name: init for init in graph.initializer}
    readers = Counter(name for node in graph.node for name in node.input)
    graph_outputs = {output.name for output in graph.output}
    producers = {out: node for node in graph.node for out in node.output}
    removed: list[onnx.NodeProto] = []
    count = 0
    for bn in list(graph.node):
        if bn.op_type != "BatchNormalization" or len(bn.output) != 1 or len(bn.input) != 5:
            continue
        conv = producers.get(bn.input[0])
        if conv is None or conv.op_type != "Conv" or conv.output[0] in graph_outputs:
            continue
        if readers[conv.output[0]] != 1:
            continue
        names = [*conv.input[1:], *bn.input[1:]]
        if any(name not in initializers or readers[name] != 1 for name in names):
            continue
        epsilon = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
        scale, shift, mean, var = (
            numpy_helper.to_array(initializers[n]).astype(np.float64) for n in bn.input[1:]
        )
        weight = numpy_helper.to_array(initializers[conv.input[1]]).astype(np.float64)
        bias = (
            numpy_helper.to_array(initializers[conv.input[2]]).astype(np.float64)
            if len(conv.input) > 2 and conv.input[2]
            else np.zeros(weight.shape[0])
        )
        factor = scale / np.sqrt(var + epsilon)
        new_weight = (weight * factor.reshape(-1, *([1] * (weight.ndim - 1)))).astype(np.float32)
        new_bias = ((bias - mean) * factor + shift).astype(np.float32)
        initializers[conv.input[1]].CopyFrom(numpy_helper.from_array(new_weight, conv.input[1]))
        bias_name = (
            conv.input[2]
            if len(conv.input) > 2 and conv.input[2]
            else f"{conv.name or conv.output[0]}.bias_folded"
        )
        if bias_name in initializers:
            initializers[bias_name].CopyFrom(numpy_helper.from_array(new_bias, bias_name))
        else:
            graph.initializer.append(numpy_helper.from_array(new_bias, bias_name))
            initializers[bias_name] = graph.initializer[-1]
        inputs = [conv.input[0], conv.input[1], bias_name]
        replacement = helper.make_node("Conv", inputs, [bn.output[0]], name=conv.name)
        replacement.attribute.extend(conv.attribute)
        conv.CopyFrom(replacement)
        removed.append(bn)
        count += 1
    gone = {name for bn in removed for name in bn.input[:1]}
    for bn in removed:
        graph.node.remove(bn)
    stale = [vi for vi in graph.value_info if vi.name in gone]
    for vi in stale:
        graph.value_info.remove(vi)
    dropped = {name for bn in removed for name in bn.input[1:]}
    kept = [init for init in graph.initializer if init.name not in dropped]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return folded, count
