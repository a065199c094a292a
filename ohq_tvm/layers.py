"""What the pipeline knows about each quantizable layer: shapes, attributes, MACs, weight size.

Read from a module whose layers carry ids (``ohq_tvm.passes.AssignLayerIds``). Later stages (measurement,
sensitivity, the solver, reports) read these records, never the IR itself.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import tvm
from tvm import relax

from .passes.layer_id import LAYERS_ATTR, bound_values, constant_weight, identified_layers
from .precision import Precision


def _shape(expr: relax.Expr) -> tuple[int, ...]:
    return tuple(int(d) for d in expr.ty.shape)


@dataclass(frozen=True)
class LayerInfo:
    """One quantizable layer (conv2d in NCHW/OIHW, or dense ``x @ W`` with ``W`` of shape [K, N])."""

    layer_id: str
    onnx_name: str
    op: str  # "conv2d" | "depthwise_conv2d" | "grouped_conv2d" | "dense"
    input_shape: tuple[int, ...]
    weight_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    groups: int = 1
    strides: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()

    @property
    def weight_elements(self) -> int:
        return math.prod(self.weight_shape)

    @property
    def output_channels(self) -> int:
        return self.weight_shape[0] if self.op != "dense" else self.weight_shape[-1]

    @property
    def macs(self) -> int:
        """Multiply-accumulates of one forward pass."""
        if self.op == "dense":
            reduction = self.weight_shape[0]
            return math.prod(self.output_shape) * reduction
        _, cin_per_group, kh, kw = self.weight_shape
        return math.prod(self.output_shape) * cin_per_group * kh * kw

    def weight_bytes(self, precision: Precision) -> int:
        """Stored weight size: packed values plus one fp32 scale per output channel when quantized."""
        packed = math.ceil(self.weight_elements * precision.weight_bits / 8)
        scales = 4 * self.output_channels if precision.is_integer else 0
        return packed + scales

    def to_json(self) -> dict:
        record = asdict(self)
        record.update(macs=self.macs, weight_elements=self.weight_elements)
        return record


def _conv_kind(groups: int, weight_shape: tuple[int, ...], input_shape: tuple[int, ...]) -> str:
    if groups == 1:
        return "conv2d"
    cin = input_shape[1]
    return "depthwise_conv2d" if groups == cin and weight_shape[1] == 1 else "grouped_conv2d"


def quantizable_layers(mod: tvm.IRModule) -> list[LayerInfo]:
    """The layers of ``mod["main"]`` that carry ids, in program order.

    Raises ``ValueError`` if the module has quantizable calls but no ids (run ``AssignLayerIds`` first).
    """
    func = mod["main"]
    names = dict(func.attrs[LAYERS_ATTR]) if func.attrs and LAYERS_ATTR in func.attrs else {}
    values = bound_values(func)
    layers = []
    for layer_id, binding in identified_layers(func):
        call = binding.value
        data, output = _shape(call.args[0]), _shape(binding.var)
        if call.op.name == "relax.nn.conv2d":
            attrs = call.attrs
            weight = tuple(int(d) for d in constant_weight(call, values).value.shape)
            groups = int(attrs.groups)
            info = LayerInfo(
                layer_id,
                str(names.get(layer_id, "")),
                _conv_kind(groups, weight, data),
                data,
                weight,
                output,
                groups=groups,
                strides=tuple(int(s) for s in attrs.strides),
                padding=tuple(int(p) for p in attrs.padding),
                dilation=tuple(int(d) for d in attrs.dilation),
            )
        else:
            info = LayerInfo(
                layer_id, str(names.get(layer_id, "")), "dense", data, _shape(call.args[1]), output
            )
        layers.append(info)
    return layers
