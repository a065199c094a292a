"""The layer graph of a model: each layer with its epilogue, where its input comes from, who reads it.

A *layer* (see :mod:`.layer_id`) is followed in the imported model by its bias ``add`` and activation
(``relu`` or a constant ``clip``) as separate Relax calls. Both the rewrite (an integer layer absorbs them
into its accumulator and requantize) and the measurement of a layer on a board (the layer is timed with its
epilogue, the way fusion runs it) need the same view of that chain, so it is computed once, here.

Everything that is neither a layer nor part of a layer's epilogue is *glue* (residual adds, pooling,
reshapes, softmax); glue always computes in float32, whatever the plan.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
from tvm import relax
from tvm.ir.expr import Constant

from .layer_id import bound_values, layer_bindings, layer_id_of


def channel_vector(value: Constant, channels: int, conv: bool) -> np.ndarray | None:
    """A bias-like constant as a per-channel vector, if it broadcasts along the output channels only."""
    array = value.value.numpy()
    if array.dtype != np.float32:
        return None
    shape = array.shape
    if array.size == 1:
        return np.full(channels, array.reshape(()), np.float32)
    if conv and len(shape) in (3, 4) and shape[-3] == channels and array.size == channels:
        return array.reshape(channels)
    if not conv and shape[-1] == channels and array.size == channels:
        return array.reshape(channels)
    return None


def _number(expr: relax.Expr) -> float | None:
    """A constant scalar bound: a ``FloatImm``/``IntImm`` (or a ``PrimValue`` wrapping one)."""
    value = getattr(expr, "value", None)
    if isinstance(value, (int, float)):
        return float(value)
    inner = getattr(value, "value", None)
    return float(inner) if isinstance(inner, (int, float)) else None


def clip_bounds(call: relax.Call) -> tuple[float, float] | None:
    """(low, high) of a ``relu`` or a ``clip`` with constant bounds, else ``None``."""
    if call.op.name == "relax.nn.relu":
        return 0.0, np.inf
    if call.op.name == "relax.clip":
        low, high = _number(call.args[1]), _number(call.args[2])
        if low is not None and high is not None:
            return low, high
    return None


@dataclass
class LayerNode:
    """One layer and its epilogue.

    ``end`` is the variable holding the layer's final value (after the bias and activation it owns);
    ``epilogue`` the bindings between the layer call and ``end``. ``producer`` is the layer whose ``end``
    is this layer's data input (``None``: a model input or glue). ``readers`` lists, for every use of
    ``end``, the layer id reading it as its data input, or ``None`` for any other reader (glue, the
    function result, a non-data argument). ``input_bounds`` are the bounds of the activation that
    produces the data input, if one does; ``source`` names the data input tensor (layers reading the
    same tensor have the same ``source``).
    """

    layer_id: str
    binding: relax.VarBinding
    end: relax.Var
    bias: np.ndarray | None = None
    bounds: tuple[float, float] | None = None
    epilogue: list[relax.Var] = field(default_factory=list)
    producer: str | None = None
    readers: list[str | None] = field(default_factory=list)
    input_bounds: tuple[float, float] | None = None
    source: str = ""

    @property
    def call(self) -> relax.Call:
        return self.binding.value

    @property
    def is_conv(self) -> bool:
        return self.call.op.name == "relax.nn.conv2d"

    @property
    def input_nonnegative(self) -> bool:
        """True when the data input is produced by an activation with a lower bound of 0 or more.

        Calibrated ranges then start at 0 and the uint8 zero point is 0 (padding needs no explicit pad).
        """
        return self.input_bounds is not None and self.input_bounds[0] >= 0


@dataclass
class LayerGraph:
    """All layers of a function (program order), the glue bindings, and every variable's readers."""

    nodes: dict[str, LayerNode]
    glue: list[relax.VarBinding]
    uses: dict[relax.Var, list[relax.VarBinding | None]]
    values: dict[relax.Var, relax.Expr]


def _sole_call_reader(uses, var: relax.Var) -> relax.VarBinding | None:
    readers = uses[var]
    if len(readers) == 1 and readers[0] is not None and isinstance(readers[0].value, relax.Call):
        return readers[0]
    return None


def _epilogue(node: LayerNode, uses, values, channels: int) -> None:
    """Follow the layer's bias add and activation while the layer is their only input user."""
    reader = _sole_call_reader(uses, node.end)
    if reader is not None and reader.value.op.name == "relax.add":
        value = reader.value
        other = value.args[1] if value.args[0].same_as(node.end) else value.args[0]
        other = values.get(other, other)
        if isinstance(other, Constant):
            bias = channel_vector(other, channels, node.is_conv)
            if bias is not None:
                node.bias, node.end = bias, reader.var
                node.epilogue.append(reader.var)
    reader = _sole_call_reader(uses, node.end)
    if reader is not None:
        bounds = clip_bounds(reader.value)
        if bounds is not None:
            node.bounds, node.end = bounds, reader.var
            node.epilogue.append(reader.var)


def _output_channels(node: LayerNode) -> int:
    shape = [int(d) for d in node.binding.var.ty.shape]
    return shape[1] if node.is_conv else shape[-1]


def _tensor_token(expr: relax.Expr, bindings, params) -> str:
    for index, param in enumerate(params):
        if param.same_as(expr):
            return f"param{index}"
    for index, binding in enumerate(bindings):
        if binding.var.same_as(expr):
            return f"binding{index}"
    return "expr"


def layer_graph(func: relax.Function) -> LayerGraph:
    """Analyse ``func`` (a function with layer ids, not yet rewritten)."""
    values = bound_values(func)
    uses: dict[relax.Var, list[relax.VarBinding | None]] = defaultdict(list)
    bindings = [b for block in func.body.blocks for b in block.bindings]
    for binding in bindings:
        for var in relax.analysis.free_vars(binding.value):
            uses[var].append(binding)
    for var in relax.analysis.free_vars(func.body.body):
        uses[var].append(None)  # None: the function's result
    nodes: dict[str, LayerNode] = {}
    for binding in layer_bindings(func):
        layer_id = layer_id_of(binding.var)
        if layer_id is None:
            raise ValueError(f"layer bound to {binding.var.name!r} has no id; apply AssignLayerIds first")
        node = LayerNode(layer_id, binding, binding.var)
        _epilogue(node, uses, values, _output_channels(node))
        nodes[layer_id] = node
    by_end = {node.end: node for node in nodes.values()}
    by_call = {node.binding.var: node for node in nodes.values()}
    for node in nodes.values():
        data = node.call.args[0]
        node.source = _tensor_token(data, bindings, func.params)
        producer = by_end.get(data) if isinstance(data, relax.Var) else None
        node.producer = producer.layer_id if producer is not None else None
        if isinstance(data, relax.Var) and data in values and isinstance(values[data], relax.Call):
            node.input_bounds = clip_bounds(values[data])
        for reader in uses[node.end]:
            target = by_call.get(reader.var) if reader is not None else None
            reads_data = target is not None and target.call.args[0].same_as(node.end)
            node.readers.append(target.layer_id if reads_data else None)
    owned = {node.binding.var for node in nodes.values()}
    owned.update(var for node in nodes.values() for var in node.epilogue)
    glue = [b for b in bindings if b.var not in owned]
    return LayerGraph(nodes, glue, dict(uses), values)


__all__ = ["LayerGraph", "LayerNode", "channel_vector", "clip_bounds", "layer_graph"]
