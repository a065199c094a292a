"""Fold, in the ONNX graph: subgraphs whose values are known before the model runs into initializers,
inference-mode BatchNormalization into the Conv that feeds it, and zero Pads into the Convs they feed.

Exporters compute shapes at run time (``Shape`` → ``Gather`` → arithmetic → ``Concat`` feeding ``Pad`` or
``Reshape``) even where every input shape is static; TVM's importer needs those values as constants, so
they are evaluated here with ONNX's reference implementation. The other two folds are done before import
so that each conv's weight in Relax is exactly an ONNX initializer: layer ids are found by matching
weights to ONNX nodes, and quantization must see the weight the layer really multiplies by (quantizing a
conv and then scaling by a BN would quantize the wrong tensor). Relax's own ``FoldBatchnormToConv2D``
would do the arithmetic but drops the bindings that carry layer ids.
"""

from __future__ import annotations

import contextlib
from collections import Counter

import numpy as np
import onnx
from onnx import helper, numpy_helper, shape_inference
from onnx.reference import ReferenceEvaluator

_DEFAULT_DOMAINS = ("", "ai.onnx")
# Never evaluated at import: random operators (a new value on every run), operators holding subgraphs, and
# the quantization operators a QDQ model keeps as its structure.
_NOT_FOLDED = {
    "Bernoulli",
    "Multinomial",
    "RandomNormal",
    "RandomNormalLike",
    "RandomUniform",
    "RandomUniformLike",
    "If",
    "Loop",
    "Scan",
    "QuantizeLinear",
    "DequantizeLinear",
    "DynamicQuantizeLinear",
}
# A folded value may be as large as the constants it is computed from, or this many elements: a
# ConstantOfShape or Expand is cheaper to compute at run time than to store.
_MAX_GROWN_ELEMENTS = 4096


def fold_constants(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """A copy of ``model`` with every node whose outputs are known before it runs replaced by initializers
    of those outputs; and how many nodes were replaced.

    A node's outputs are known when its inputs are constants (initializers, ``Constant`` nodes, outputs
    folded before it), or when it is a ``Shape`` or ``Size`` of a tensor whose shape the graph states
    statically (graph inputs, and ``value_info`` from shape inference: run it first). Folding repeats,
    with shape inference in between, until nothing more folds. Left alone: nodes outside the default
    domain, random and control-flow operators, Quantize/DequantizeLinear, nodes producing graph outputs,
    values that would grow beyond both their inputs' size and 4096 elements, and any node ONNX's
    reference implementation cannot evaluate (TVM's importer then sees it as it was).
    """
    folded = onnx.ModelProto()
    folded.CopyFrom(model)
    version = next((o.version for o in folded.opset_import if o.domain in _DEFAULT_DOMAINS), None)
    opsets = {"": version} if version is not None else None
    total = 0
    while True:
        count = _fold_known_nodes(folded.graph, opsets)
        if not count:
            return folded, total
        total += count
        with contextlib.suppress(Exception):  # more static shapes let more Shape nodes fold
            folded = shape_inference.infer_shapes(folded, data_prop=True)


def _fold_known_nodes(graph: onnx.GraphProto, opsets: dict[str, int] | None) -> int:
    """One pass of :func:`fold_constants` over ``graph``, in place; how many nodes it replaced."""
    known = graph_constants(graph)
    shapes = _static_shapes(graph)
    graph_outputs = {output.name for output in graph.output}
    replaced: list[onnx.NodeProto] = []
    for node in graph.node:
        if node.op_type == "Constant" or node.domain not in _DEFAULT_DOMAINS or node.op_type in _NOT_FOLDED:
            continue
        if any(name in graph_outputs for name in node.output):
            continue
        values = _shape_of(node, shapes, known)
        if values is None and all(not name or name in known for name in node.input):
            values = _evaluate(node, known, opsets)
        if values is None:
            continue
        for name, value in zip(node.output, values, strict=True):
            if name:
                known[name] = value
                graph.initializer.append(numpy_helper.from_array(value, name))
        replaced.append(node)
    for node in replaced:
        graph.node.remove(node)
    folded_names = {name for node in replaced for name in node.output}
    for vi in [vi for vi in graph.value_info if vi.name in folded_names]:
        graph.value_info.remove(vi)
    _drop_unread_constants(graph, {name for node in replaced for name in node.input if name})
    return len(replaced)


def _static_shapes(graph: onnx.GraphProto) -> dict[str, tuple[int, ...]]:
    """The shapes the graph states with every dimension a number, by tensor name."""
    shapes = {}
    for vi in [*graph.input, *graph.value_info, *graph.output]:
        tensor = vi.type.tensor_type
        if tensor.HasField("shape") and all(dim.HasField("dim_value") for dim in tensor.shape.dim):
            shapes[vi.name] = tuple(int(dim.dim_value) for dim in tensor.shape.dim)
    return shapes


def _shape_of(
    node: onnx.NodeProto, shapes: dict[str, tuple[int, ...]], known: dict[str, np.ndarray]
) -> list[np.ndarray] | None:
    """The output of a ``Shape`` or ``Size`` node whose input has a static shape, else None."""
    if node.op_type not in ("Shape", "Size") or not node.input:
        return None
    source = node.input[0]
    shape = known[source].shape if source in known else shapes.get(source)
    if shape is None:
        return None
    if node.op_type == "Size":
        return [np.array(int(np.prod(shape, dtype=np.int64)), dtype=np.int64)]
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    start, end = attributes.get("start", 0), attributes.get("end")
    return [np.array(shape[start:end], dtype=np.int64)]


def _evaluate(
    node: onnx.NodeProto, known: dict[str, np.ndarray], opsets: dict[str, int] | None
) -> list[np.ndarray] | None:
    """``node``'s outputs computed from the constants it reads, or None when it cannot (or should not)
    be folded: the reference implementation fails, returns something other than tensors, or the result
    outgrows the size limit."""
    feeds = {name: known[name] for name in node.input if name}
    try:
        values = ReferenceEvaluator(node, opsets=opsets).run(None, feeds)
    except Exception:  # an operator the reference implementation lacks or rejects: left to TVM
        return None
    values = [np.asarray(value) if isinstance(value, np.ndarray | np.generic) else value for value in values]
    if len(values) != len(node.output) or not all(
        isinstance(value, np.ndarray) and value.dtype != object for value in values
    ):
        return None
    limit = max(sum(value.size for value in feeds.values()), _MAX_GROWN_ELEMENTS)
    if any(value.size > limit for value in values):
        return None
    return values


def fold_batch_norms(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """A copy of ``model`` with every foldable ``Conv → BatchNormalization`` pair merged; and how many.

    A pair folds when the BN is the conv's only reader, the conv output is not a graph output, the BN has
    one output (inference mode), the conv weight and bias are initializers the conv alone uses (they are
    rewritten in place), and the four BN parameters are constants: initializers, ``Constant`` nodes, or
    ``Identity`` copies of either, however many readers they have (torch exports parameters equal across
    layers, e.g. freshly initialised BNs, as one initializer behind ``Identity`` nodes). Anything else is
    left as it was; constants and ``Identity`` nodes nothing reads any more are dropped.
    """
    folded = onnx.ModelProto()
    folded.CopyFrom(model)
    graph = folded.graph
    initializers = {init.name: init for init in graph.initializer}
    constants = graph_constants(graph, identities=True)
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
        if any(name not in initializers or readers[name] != 1 for name in conv.input[1:]):
            continue
        if any(name not in constants for name in bn.input[1:]):
            continue
        epsilon = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
        scale, shift, mean, var = (constants[n].astype(np.float64) for n in bn.input[1:])
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
    _drop_unread_constants(graph, {name for bn in removed for name in bn.input[1:]})
    return folded, count


def _drop_unread_constants(graph: onnx.GraphProto, candidates: set[str]) -> None:
    """Remove the ``candidates`` (initializers, ``Constant`` or ``Identity`` outputs) no node or graph
    output reads any more, following ``Identity`` chains back to what they copy."""
    outputs = {output.name for output in graph.output}
    producers = {out: node for node in graph.node for out in node.output}
    pending = set(candidates)
    while pending:
        name = pending.pop()
        if name in outputs or any(name in node.input for node in graph.node):
            continue
        node = producers.pop(name, None)
        if node is not None and node.op_type in ("Identity", "Constant"):
            graph.node.remove(node)
            pending.update(node.input)
        for init in [init for init in graph.initializer if init.name == name]:
            graph.initializer.remove(init)


def fold_pads_into_convs(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """A copy of ``model`` with every zero ``Pad`` that only feeds 2-D ``Conv`` nodes merged into their
    ``pads``; and how many were merged.

    Exporters write TensorFlow's "SAME" padding of strided convs (EfficientNet-Lite among others) as an
    explicit constant ``Pad`` before the ``Conv``. Left alone it becomes a float operator of its own
    between layers, which an integer plan must dequantize for and quantize after; merged, the conv pads
    itself (asymmetrically where needed) and the integer kernel pads with the zero point. A ``Pad``
    folds when its mode is ``constant``, its value 0, its pads constants (initializers, ``Constant``
    nodes or the opset < 11 attribute) touching only the two spatial axes of a 4-D tensor, and every
    reader is a ``Conv`` without ``auto_pad``. Anything else is left as it was.
    """
    folded = onnx.ModelProto()
    folded.CopyFrom(model)
    graph = folded.graph
    constants = graph_constants(graph)
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    graph_outputs = {output.name for output in graph.output}
    removed = []
    for pad in list(graph.node):
        spatial = _zero_spatial_pads(pad, constants)
        if spatial is None or pad.output[0] in graph_outputs:
            continue
        convs = readers.get(pad.output[0], [])
        if not convs or any(not _pads_itself(conv, pad.output[0]) for conv in convs):
            continue
        top, left, bottom, right = spatial
        for conv in convs:
            attributes = {a.name: a for a in conv.attribute}
            current = list(attributes["pads"].ints) if "pads" in attributes else [0, 0, 0, 0]
            merged = [current[0] + top, current[1] + left, current[2] + bottom, current[3] + right]
            kept = [a for a in conv.attribute if a.name != "pads"]
            del conv.attribute[:]
            conv.attribute.extend([*kept, helper.make_attribute("pads", merged)])
            conv.input[0] = pad.input[0]
        removed.append(pad)
    for pad in removed:
        graph.node.remove(pad)
    still_read = {name for node in graph.node for name in node.input}
    stale = [vi for vi in graph.value_info if vi.name in {pad.output[0] for pad in removed}]
    for vi in stale:
        graph.value_info.remove(vi)
    unused = [init for init in graph.initializer if init.name not in still_read]
    for init in unused:
        if any(init.name in pad.input for pad in removed):
            graph.initializer.remove(init)
    return folded, len(removed)


def graph_constants(graph: onnx.GraphProto, identities: bool = False) -> dict[str, np.ndarray]:
    """The values of ``graph``'s initializers and of its ``Constant`` nodes' outputs, by tensor name; with
    ``identities``, also of ``Identity`` copies of those (how exporters share equal parameters)."""
    constants = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        elif identities and node.op_type == "Identity" and node.input[0] in constants:
            constants[node.output[0]] = constants[node.input[0]]
    return constants


def _zero_spatial_pads(node: onnx.NodeProto, constants: dict[str, np.ndarray]) -> tuple[int, ...] | None:
    """``(top, left, bottom, right)`` of a zero-constant Pad of a 4-D NCHW tensor, else None."""
    if node.op_type != "Pad":
        return None
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    mode = attributes.get("mode", b"constant")
    if (mode.decode() if isinstance(mode, bytes) else mode) != "constant":
        return None
    if "pads" in attributes:  # opset < 11
        pads, value = list(attributes["pads"]), float(attributes.get("value", 0.0))
    else:
        if len(node.input) < 2 or node.input[1] not in constants or (len(node.input) > 3 and node.input[3]):
            return None  # pads computed at run time, or an axes input: not ours to fold
        pads = [int(p) for p in constants[node.input[1]].reshape(-1)]
        value_name = node.input[2] if len(node.input) > 2 else ""
        if value_name and value_name not in constants:
            return None
        value = float(constants[value_name].reshape(-1)[0]) if value_name else 0.0
    if value != 0.0 or len(pads) != 8 or any(pads[i] for i in (0, 1, 4, 5)) or min(pads) < 0:
        return None
    return pads[2], pads[3], pads[6], pads[7]


def _pads_itself(conv: onnx.NodeProto, data: str) -> bool:
    """Whether ``conv`` is a Conv reading ``data`` as its input (not its weight) with explicit pads."""
    if conv.op_type != "Conv" or conv.input[0] != data or data in conv.input[1:]:
        return False
    attributes = {a.name: helper.get_attribute_value(a) for a in conv.attribute}
    auto_pad = attributes.get("auto_pad", b"NOTSET")
    kernel = attributes.get("kernel_shape")
    two_d = kernel is None or len(kernel) == 2
    return (auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad) == "NOTSET" and two_d
