"""Stable layer identity for every quantizable call, mapped back to the ONNX node it came from.

A *layer* is a ``relax.nn.conv2d`` (regular, depthwise or grouped) or a ``relax.matmul`` whose weight is a
constant (dense / Gemm / MatMul with an initializer). Its id is carried in the name of the variable the
call is bound to (``ohq_<layer_id>``), so any pass that keeps the binding keeps the id, and the function
attribute ``ohq_layers`` maps each id to the ONNX node name. Plans, database rows and reports use these
ids, which are the ONNX node names themselves wherever those are unique and printable.
"""

from __future__ import annotations

import hashlib
import re
from collections import defaultdict
from collections.abc import Mapping

import numpy as np
import onnx
import tvm
from onnx import numpy_helper
from tvm import relax
from tvm.ir.expr import Constant
from tvm.relax.expr_functor import PyExprMutator, mutator

from ohq_tvm.errors import OHQError

LAYER_VAR_PREFIX = "ohq_"
LAYERS_ATTR = "ohq_layers"
_QUANTIZABLE_ONNX_OPS = {"Conv", "Gemm", "MatMul"}
# What LegalizeOps (and FuseOps after it) name the TIR functions a conv2d or matmul becomes.
_LOWERED_LAYER_NAMES = ("conv2d", "matmul")


def constant_weight(
    call: relax.Expr, values: Mapping[relax.Var, relax.Expr] | None = None
) -> Constant | None:
    """The constant weight of a conv2d/matmul call, else ``None``.

    Looks through variables (``values`` maps each bound variable to its value) and a transpose, the form
    an ONNX Gemm with ``transB=1`` takes before ``FoldConstant``.
    """
    if not isinstance(call, relax.Call) or not isinstance(call.op, tvm.ir.Op):
        return None
    if call.op.name not in {"relax.nn.conv2d", "relax.matmul"} or len(call.args) < 2:
        return None
    values = values or {}
    weight = call.args[1]
    for _ in range(3):
        if isinstance(weight, relax.Var) and weight in values:
            weight = values[weight]
        elif isinstance(weight, relax.Call) and getattr(weight.op, "name", "") == "relax.permute_dims":
            weight = weight.args[0]
        else:
            break
    return weight if isinstance(weight, Constant) else None


def bound_values(func: relax.Function) -> dict[relax.Var, relax.Expr]:
    """Every variable bound in ``func``'s body, mapped to its value."""
    return {
        binding.var: binding.value
        for block in func.body.blocks
        for binding in block.bindings
        if isinstance(binding, relax.VarBinding)
    }


def _fingerprint(array: np.ndarray) -> str:
    """Shape-free, orientation-free digest: a Gemm weight [N, K] arrives in Relax as [K, N]."""
    values = np.ascontiguousarray(array, dtype=np.float32)
    sorted_bytes = np.sort(values, axis=None).tobytes()
    return hashlib.sha256(sorted_bytes).hexdigest()


def _onnx_weight_owners(model: onnx.ModelProto) -> dict[str, list[str]]:
    """fingerprint → ONNX node names (in graph order) whose weight initializer has that content."""
    initializers = {init.name: init for init in model.graph.initializer}
    owners: dict[str, list[str]] = defaultdict(list)
    for index, node in enumerate(model.graph.node):
        if node.op_type not in _QUANTIZABLE_ONNX_OPS or len(node.input) < 2:
            continue
        weight = node.input[1] if node.input[1] in initializers else None
        if node.op_type == "MatMul" and weight is None and node.input[0] in initializers:
            weight = node.input[0]
        if weight is None:
            continue
        array = numpy_helper.to_array(initializers[weight])
        owners[_fingerprint(array)].append(node.name or f"{node.op_type}_{index}")
    return owners


def _sanitize(name: str) -> str:
    cleaned = re.sub(r"[^0-9A-Za-z_]+", "_", name).strip("_")
    return cleaned or "layer"


@mutator
class _Renamer(PyExprMutator):
    def __init__(self, names: dict[relax.Var, str], mod: tvm.IRModule | None = None) -> None:
        super().__init__(mod)
        self.names = names

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        value = self.visit_expr(binding.value)
        name = self.names.get(binding.var)
        if name is None:
            self.builder_.emit_normalized(relax.VarBinding(binding.var, value))
            return
        kind = relax.DataflowVar if isinstance(binding.var, relax.DataflowVar) else relax.Var
        renamed = kind(name, binding.var.ty)
        self.set_var_remap(binding.var, renamed)
        self.builder_.emit_normalized(relax.VarBinding(renamed, value))


def layer_bindings(func: relax.Function) -> list[relax.VarBinding]:
    """Bindings of quantizable calls, in program order."""
    values = bound_values(func)
    found = []
    for block in func.body.blocks:
        for binding in block.bindings:
            if isinstance(binding, relax.VarBinding) and constant_weight(binding.value, values) is not None:
                found.append(binding)
    return found


def lowered_layer_functions(mod: tvm.IRModule) -> list[str]:
    """Names of the TIR functions in ``mod`` that compute a conv2d or matmul (``conv2d``,
    ``fused_conv2d_add_relu``, ...): what the layers became once ``LegalizeOps`` (or ``relax.build``'s
    pipeline) lowered them. Empty for a module whose layers are still Relax calls."""
    return sorted(
        gv.name_hint
        for gv, func in mod.functions_items()
        if not isinstance(func, relax.Function) and any(n in gv.name_hint for n in _LOWERED_LAYER_NAMES)
    )


def check_not_lowered(mod: tvm.IRModule, what: str) -> None:
    """Raise :class:`OHQError` when ``main`` has no layer because its convs and matmuls were already
    lowered to TIR: ``what`` (a pass name) finds nothing to work on there and says so in one line,
    instead of failing later on an empty layer list. Does nothing when ``main`` has layers, or has none
    and was never lowered."""
    if layer_bindings(mod["main"]):
        return
    lowered = lowered_layer_functions(mod)
    if lowered:
        shown = ", ".join(lowered[:3]) + (", ..." if len(lowered) > 3 else "")
        raise OHQError(
            f"{what} finds no conv/dense layer in main: they are already lowered to TIR functions "
            f"({shown}), as LegalizeOps and relax.build's pipeline do; run {what} before LegalizeOps"
        )


def layer_id_of(var: relax.Var) -> str | None:
    """The layer id carried by a binding variable, or ``None``."""
    name = var.name
    return name[len(LAYER_VAR_PREFIX) :] if name.startswith(LAYER_VAR_PREFIX) else None


def identified_layers(func: relax.Function) -> list[tuple[str, relax.VarBinding]]:
    """``(layer id, binding)`` of every quantizable call of ``func``, in program order.

    Raises ``ValueError`` for a layer without an id (run ``AssignLayerIds`` first).
    """
    found = []
    for binding in layer_bindings(func):
        layer_id = layer_id_of(binding.var)
        if layer_id is None:
            raise ValueError(f"layer bound to {binding.var.name!r} has no id; apply AssignLayerIds first")
        found.append((layer_id, binding))
    return found


@tvm.transform.module_pass(opt_level=0, name="AssignLayerIds")
class AssignLayerIds:
    """Name every quantizable call of ``main`` and record ``ohq_layers`` (id → ONNX node name).

    With ``onnx_model`` given, each call is matched to the ONNX Conv/Gemm/MatMul whose weight initializer
    holds the same values (layout-independent), and the node's name becomes the id (sanitized, made unique).
    Calls with no match, or no model, get ``<op>_<n>`` ids. Calls that already carry an id keep it, so the
    pass is idempotent. Does nothing to a module without quantizable calls; raises :class:`OHQError` for
    one whose layers ``LegalizeOps`` has already lowered to TIR (run this pass before it).

    A module imported with TVM's own ``tvm.relax.frontend.onnx.from_onnx`` (weights kept as constants,
    its default) gets the ONNX node names when given the same ``onnx_model``.
    """

    def __init__(self, onnx_model: onnx.ModelProto | None = None) -> None:
        self.owners = _onnx_weight_owners(onnx_model) if onnx_model is not None else {}

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        check_not_lowered(mod, "AssignLayerIds")
        func = mod["main"]
        bindings = layer_bindings(func)
        values = bound_values(func)
        if not bindings:
            return mod
        owners = {key: list(names) for key, names in self.owners.items()}
        existing = dict(func.attrs[LAYERS_ATTR]) if func.attrs and LAYERS_ATTR in func.attrs else {}
        layers: dict[str, str] = {str(k): str(v) for k, v in existing.items()}
        names: dict[relax.Var, str] = {}
        counters: dict[str, int] = defaultdict(int)
        for binding in bindings:
            if layer_id_of(binding.var) is not None:
                continue
            op = "conv" if binding.value.op.name == "relax.nn.conv2d" else "dense"
            candidates = owners.get(_fingerprint(constant_weight(binding.value, values).value.numpy()), [])
            onnx_name = candidates.pop(0) if candidates else None
            base = _sanitize(onnx_name) if onnx_name else f"{op}_{counters[op]}"
            counters[op] += 1
            layer_id, suffix = base, 1
            while layer_id in layers:
                suffix += 1
                layer_id = f"{base}_{suffix}"
            layers[layer_id] = onnx_name or ""
            names[binding.var] = LAYER_VAR_PREFIX + layer_id
        if not names:
            return mod
        renamed = _Renamer(names, mod).visit_expr(func)
        renamed = renamed.with_attr(LAYERS_ATTR, layers)
        updated = mod.clone() if hasattr(mod, "clone") else tvm.IRModule(dict(mod.functions), attrs=mod.attrs)
        updated["main"] = renamed
        return updated
