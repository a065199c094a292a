"""Workloads: the unique operators of a model, each in every precision a plan can give it.

A model's running time under a plan is modelled as a sum of parts that can each be timed alone on a board:

- ``layer``: one layer with its epilogue (bias, activation) in one precision, in the form it takes inside
  a plan (:mod:`ohq_tvm.passes.layer_compute`): fp32 and fp16 read and write float32 (fp16 casts inside);
  int8/int4w read uint8 and write uint8 (the requantize between integer layers is part of the layer);
- ``quantize``: float32 → uint8 of an integer layer's input, paid when that input is not produced by an
  integer layer;
- ``dequantize``: uint8 → float32 of an integer layer's output, paid when anything but an integer layer
  reads it;
- ``glue``: every other operator (residual adds, pooling, reshapes), always float32.

A conversion is timed the way the build runs it (see :meth:`Workload.fused_layer`). The build fuses a
``dequantize`` into the integer layer that produces the value (its int32 accumulator becomes float32
instead of uint8), and a ``quantize`` into the float layer that produces its input when every reader of
that layer is a layer (the tensor is then needed in no other form). Timed alone, each would pay a pass
over memory and a parallel launch that the model does not (on MobileNetV2 the mixed plans were predicted
up to 37% high that way, growing with the number of boundaries). So such a conversion's workload is its
layer with the conversion fused, and its cost is what that adds to the layer timed alone
(:func:`~ohq_tvm.oqa.cost.conversion_ms`). A quantize whose input comes from glue, a model input, or a
layer whose output something else also reads stays a standalone operator, as it is in the model.

A workload is described by shapes and attributes only (weights are synthetic: latency does not depend on
their values), so its key is shared by every model containing the same operator.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field, fields, replace
from functools import cached_property

import numpy as np
import tvm
from tvm import relax

from ..errors import OHQError
from ..layers import LayerInfo, quantizable_layers
from ..passes.annotate import candidates
from ..passes.layer_compute import (
    LayerSpec,
    emit_accumulator,
    emit_dequantize,
    emit_half,
    emit_quantize,
    emit_requantize,
)
from ..passes.layer_graph import LayerGraph, layer_graph
from ..precision import Precision
from ..qparams import ACTIVATION_DTYPE, ActivationQParams

KINDS = ("layer", "quantize", "dequantize", "glue")
# Synthetic quantization parameters: any valid ones give the same kernels and the same running time.
_SYNTHETIC_QP = ActivationQParams(0.05, 0)
_SYNTHETIC_QP_SHIFTED = ActivationQParams(0.05, 128)


@dataclass(frozen=True)
class Workload:
    """One operator to time: what it computes, in which precision, on which shapes.

    ``activation`` is ``None``, ``"relu"`` or ``"clip:LOW:HIGH"``. ``input_zero_point`` says whether the
    integer layer's input has a non-zero zero point (padding then needs an explicit pad).
    ``source`` is the TVMScript of a glue operator (what identifies it: the op, its attributes, shapes;
    constants are elided, so a glue workload is built from the module extracted with it).
    """

    kind: str
    op: str
    precision: Precision
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    weight_shape: tuple[int, ...] = ()
    strides: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1
    bias: bool = False
    activation: str | None = None
    input_zero_point: bool = False
    source: str = ""
    _module: tvm.IRModule | None = field(default=None, compare=False, repr=False, hash=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown workload kind {self.kind!r}")

    def to_json(self) -> dict:
        record = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "_module"}
        record["precision"] = self.precision.value
        return record

    @classmethod
    def from_json(cls, record: dict) -> Workload:
        values = dict(record)
        values["precision"] = Precision(values["precision"])
        for name in ("input_shape", "output_shape", "weight_shape", "strides", "padding", "dilation"):
            values[name] = tuple(values.get(name, ()))
        return cls(**values)

    @cached_property
    def key(self) -> str:
        """Stable identity: the same operator in the same precision has the same key in every model."""
        text = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:20]

    @cached_property  # read for every conversion of every plan the solver and greedy evaluate
    def fused_layer(self) -> Workload | None:
        """For a conversion fused into a layer (a ``quantize``/``dequantize`` whose op is the layer's), the
        layer alone in the same precision; ``None`` for a layer, glue, or a standalone conversion."""
        if self.kind in ("quantize", "dequantize") and self.op != self.kind:
            return replace(self, kind="layer")
        return None

    @property
    def label(self) -> str:
        shape = "x".join(map(str, self.input_shape))
        if self.kind == "layer":
            return f"{self.op} {shape} w{'x'.join(map(str, self.weight_shape))} @{self.precision}"
        if self.fused_layer is not None:
            return f"{self.kind} fused into {self.fused_layer.label}"
        return f"{self.op if self.kind == 'glue' else self.kind} {shape}"

    @property
    def macs(self) -> int:
        if self.kind != "layer" and self.fused_layer is None:
            return 0
        if self.op == "dense":
            return math.prod(self.output_shape) * self.weight_shape[0]
        return math.prod(self.output_shape) * math.prod(self.weight_shape[1:])

    # -- building ------------------------------------------------------------------------------------
    def input_dtype(self) -> str:
        if self.kind == "dequantize":  # standalone, or fused into its integer layer
            return ACTIVATION_DTYPE
        layer = self if self.kind == "layer" else self.fused_layer
        return ACTIVATION_DTYPE if layer is not None and layer.precision.is_integer else "float32"

    def module(self) -> tvm.IRModule:
        """A one-operator Relax module ``main(x) -> y`` with synthetic weights (seeded by the key)."""
        if self._module is not None:
            return self._module
        if self.kind == "glue":
            raise OHQError(f"glue workload {self.label} can only be built from the model it came from")
        bb = relax.BlockBuilder()
        x = relax.Var("x", relax.TensorType(self.input_shape, self.input_dtype()))
        with bb.function("main", [x]):
            with bb.dataflow():
                out = bb.emit_output(self._emit(bb, x))
            bb.emit_func_output(out)
        return bb.get()

    def _emit(self, bb: relax.BlockBuilder, x: relax.Var) -> relax.Expr:
        if self.kind == "quantize" and self.op == "quantize":
            return emit_quantize(bb, x, _SYNTHETIC_QP_SHIFTED)
        if self.kind == "dequantize" and self.op == "dequantize":
            qp = _SYNTHETIC_QP_SHIFTED
            return relax.op.dequantize(
                x, relax.const(qp.scale, "float32"), relax.const(qp.zero_point, "int32"), axis=-1
            )
        rng = np.random.default_rng(int(self.key[:8], 16))
        weight = rng.normal(0, 0.1, self.weight_shape).astype(np.float32)
        spec = LayerSpec(
            weight,
            conv=self.op != "dense",
            strides=self.strides or (1, 1),
            padding=self.padding or (0, 0, 0, 0),
            dilation=self.dilation or (1, 1),
            groups=self.groups,
        )
        bias = rng.normal(0, 0.1, spec.channels).astype(np.float32) if self.bias else None
        bounds = _parse_activation(self.activation)
        if self.precision.is_integer:
            qp = _SYNTHETIC_QP_SHIFTED if self.input_zero_point else _SYNTHETIC_QP
            acc = emit_accumulator(bb, x, spec, self.precision, qp, bias, len(self.output_shape))
            if self.kind == "dequantize":  # the layer's output read by float: float32 from the accumulator
                return emit_dequantize(bb, acc, bounds)
            return emit_requantize(bb, acc, _SYNTHETIC_QP, bounds)
        if self.precision is Precision.FP16:
            y = emit_half(bb, bb.emit(relax.op.astype(x, "float16")), spec)
        else:
            y = bb.emit(spec.float_compute(x, "float32"))
        if bias is not None:
            channel_shape = [1] * len(self.output_shape)
            channel_shape[1 if spec.conv else -1] = spec.channels
            y = bb.emit(relax.op.add(y, relax.const(bias.reshape(channel_shape))))
        if bounds is not None:
            low, high = bounds
            y = relax.op.nn.relu(y) if np.isinf(high) else relax.op.clip(y, low, high)
        if self.kind == "quantize":  # an integer layer reads the output: quantized in the same kernel
            return emit_quantize(bb, bb.emit(y), _SYNTHETIC_QP_SHIFTED)
        return y

    def synthetic_inputs(self, seed: int = 0) -> list[np.ndarray]:
        """Random inputs of the right shapes and dtypes for :meth:`module`'s ``main``."""
        rng = np.random.default_rng(seed)
        params = self.module()["main"].params
        arrays = []
        for param in params:
            shape = tuple(int(d) for d in param.ty.shape)
            dtype = str(param.ty.dtype)
            if dtype == ACTIVATION_DTYPE:
                arrays.append(rng.integers(0, 256, shape, dtype=np.uint8))
            else:
                arrays.append(rng.standard_normal(shape).astype(dtype))
        return arrays


def _activation_text(bounds: tuple[float, float] | None) -> str | None:
    if bounds is None:
        return None
    low, high = bounds
    return "relu" if low == 0 and np.isinf(high) else f"clip:{low:g}:{high:g}"


def _parse_activation(text: str | None) -> tuple[float, float] | None:
    if text is None:
        return None
    if text == "relu":
        return 0.0, np.inf
    _, low, high = text.split(":")
    return float(low), float(high)


def _layer_workload(info: LayerInfo, graph: LayerGraph, precision: Precision) -> Workload:
    node = graph.nodes[info.layer_id]
    return Workload(
        "layer",
        info.op,
        precision,
        info.input_shape,
        info.output_shape,
        weight_shape=info.weight_shape,
        strides=info.strides,
        padding=info.padding,
        dilation=info.dilation,
        groups=info.groups,
        bias=node.bias is not None,
        activation=_activation_text(node.bounds),
        input_zero_point=precision.is_integer and not node.input_nonnegative,
    )


def _quantize_workload(
    info: LayerInfo, graph: LayerGraph, layers: dict[str, dict[Precision, Workload]]
) -> Workload:
    """The quantize of ``info``'s input as the build runs it: fused into the float layer producing it
    when every reader of that layer is a layer, else a standalone operator."""
    producer = graph.nodes[info.layer_id].producer
    fusable = producer is not None and all(r is not None for r in graph.nodes[producer].readers)
    if fusable and Precision.FP32 in layers[producer]:
        return replace(layers[producer][Precision.FP32], kind="quantize")
    return Workload("quantize", "quantize", Precision.INT8, info.input_shape, info.input_shape)


def _substitute(call: relax.Call, mapping: dict[relax.Var, relax.Var]) -> relax.Call:
    def replace(arg: relax.Expr) -> relax.Expr:
        if isinstance(arg, relax.Var):
            return next((new for old, new in mapping.items() if old.same_as(arg)), arg)
        if isinstance(arg, relax.Tuple):
            return relax.Tuple([replace(field) for field in arg.fields])
        return arg

    return relax.Call(call.op, [replace(a) for a in call.args], call.attrs, call.ty_args)


def _glue_workload(binding: relax.VarBinding, model: tvm.IRModule) -> Workload | None:
    """A one-call module for a glue binding; ``None`` for bindings that are not operator calls. A
    ``call_tir`` (e.g. an explicit ONNX Pad, which the importer lowers to its own TIR function) takes the
    called TIR function from ``model`` along, and is labelled after it."""
    value = binding.value
    if not isinstance(value, relax.Call) or not isinstance(value.op, tvm.ir.Op):
        return None
    free = [v for v in relax.analysis.free_vars(value) if isinstance(v.ty, relax.TensorType)]
    if not free:
        return None
    params = [relax.Var(f"x{i}", v.ty) for i, v in enumerate(free)]
    body = _substitute(value, dict(zip(free, params, strict=True)))
    bb = relax.BlockBuilder()
    with bb.function("main", params):
        with bb.dataflow():
            out = bb.emit_output(body)
        bb.emit_func_output(out)
    mod = bb.get()
    called = [a for a in value.args if isinstance(a, tvm.ir.GlobalVar)]
    for function in called:
        mod[function] = model[function]
    shapes = [tuple(int(d) for d in p.ty.shape) for p in params]
    output = (
        tuple(int(d) for d in binding.var.ty.shape) if isinstance(binding.var.ty, relax.TensorType) else ()
    )
    return Workload(
        "glue",
        called[0].name_hint if called else value.op.name.removeprefix("relax."),
        Precision.FP32,
        shapes[0],
        output,
        source=mod.script(),
        _module=mod,
    )


@dataclass
class ModelWorkloads:
    """Every workload of one model, and how a plan combines them.

    ``layers[layer_id][precision]``; ``quantize``/``dequantize`` per integer-capable layer; ``glue`` in
    program order. ``producers``/``readers``/``sources`` come from the layer graph
    (:mod:`ohq_tvm.passes.layer_graph`).
    """

    layers: dict[str, dict[Precision, Workload]]
    quantize: dict[str, Workload]
    dequantize: dict[str, Workload]
    glue: list[Workload]
    producers: dict[str, str | None]
    readers: dict[str, list[str | None]]
    sources: dict[str, str]
    infos: dict[str, LayerInfo]

    def unique(self) -> list[Workload]:
        """Each distinct workload once (by key), layers first, in model order."""
        seen: dict[str, Workload] = {}
        for layer_id, options in self.layers.items():
            for workload in options.values():
                seen.setdefault(workload.key, workload)
            for table in (self.quantize, self.dequantize):
                if layer_id in table:
                    seen.setdefault(table[layer_id].key, table[layer_id])
        for workload in self.glue:
            seen.setdefault(workload.key, workload)
        return list(seen.values())


def extract_workloads(mod: tvm.IRModule, precisions: list[Precision] | None = None) -> ModelWorkloads:
    """The workloads of ``mod`` (an imported model with layer ids, optionally annotated).

    Each layer gets its annotated candidates, else ``precisions`` (default: fp32 only). Raises
    :class:`OHQError` if the module has already been rewritten by a plan.
    """
    func = mod["main"]
    if func.attrs and "ohq_plan" in func.attrs:
        raise OHQError("measure the imported model, not one with a plan applied")
    infos = {info.layer_id: info for info in quantizable_layers(mod)}
    graph = layer_graph(func)
    annotated = candidates(mod)
    default = list(dict.fromkeys(precisions or [Precision.FP32]))
    layers: dict[str, dict[Precision, Workload]] = {}
    quantize: dict[str, Workload] = {}
    dequantize: dict[str, Workload] = {}
    for layer_id, info in infos.items():
        options = annotated.get(layer_id) or default
        layers[layer_id] = {p: _layer_workload(info, graph, p) for p in options}
        integer = [p for p in options if p.is_integer]
        if integer:
            quantize[layer_id] = _quantize_workload(info, graph, layers)
            dequantize[layer_id] = replace(layers[layer_id][integer[0]], kind="dequantize")
    glue = [w for w in (_glue_workload(b, mod) for b in graph.glue) if w is not None]
    return ModelWorkloads(
        layers,
        quantize,
        dequantize,
        glue,
        producers={lid: node.producer for lid, node in graph.nodes.items()},
        readers={lid: list(node.readers) for lid, node in graph.nodes.items()},
        sources={lid: node.source for lid, node in graph.nodes.items()},
        infos=infos,
    )


__all__ = ["KINDS", "ModelWorkloads", "Workload", "extract_workloads"]
