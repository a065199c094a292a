"""Turn the ONNX importer's ``Clip`` (two TE calls, ``maximum`` then ``minimum``) back into ``relax.clip``.

TVM's ONNX frontend lowers every ``Clip`` with constant bounds (ReLU6 in MobileNet/EfficientNet) to
``call_tir(maximum, (x, c))`` followed by ``call_tir(minimum, (., c))``. Opaque TIR calls hide the
activation from everything that reasons about layers: an integer layer could not absorb it into its
requantize bounds, and the measured layer workloads would not match the model. This pass rewrites a
``call_tir`` whose PrimFunc is an element-wise max/min against a scalar constant into ``relax.clip`` with
an infinite other bound, and merges ``clip(clip(x, lo, inf), -inf, hi)`` into ``clip(x, lo, hi)`` when the
inner clip has no other reader. Anything else is left unchanged; the result is numerically identical.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import tvm
from tvm import relax, tirx
from tvm.ir.expr import Constant
from tvm.relax.expr_functor import PyExprMutator, mutator


def _single_store(stmt):
    """The one store at the bottom of a nest of blocks and loops (no sequences), else ``None``."""
    for _ in range(64):
        if hasattr(stmt, "block"):  # a block realize
            stmt = stmt.block
        elif hasattr(stmt, "value") and hasattr(stmt, "indices"):  # the store
            return stmt
        elif hasattr(stmt, "body") and not hasattr(stmt, "seq"):
            stmt = stmt.body
        else:
            return None
    return None


def _elementwise_bound(func: tirx.PrimFunc) -> str | None:
    """``"max"``/``"min"`` if ``func`` only stores ``max(A[...], B[()])`` (or ``min``), else ``None``."""
    store = _single_store(func.body)
    if store is None or len(func.params) != 3:
        return None
    value = store.value
    if isinstance(value, tirx.Max):
        kind = "max"
    elif isinstance(value, tirx.Min):
        kind = "min"
    else:
        return None
    if not (hasattr(value.a, "indices") and hasattr(value.b, "indices") and len(value.b.indices) == 0):
        return None
    return kind


def _scalar(expr: relax.Expr) -> float | None:
    if isinstance(expr, Constant) and expr.value.numpy().size == 1:
        return float(expr.value.numpy().reshape(()))
    return None


@mutator
class _ClipRewriter(PyExprMutator):
    def __init__(self, mod: tvm.IRModule) -> None:
        super().__init__(mod)
        self.mod = mod
        self.uses: dict[relax.Var, int] = defaultdict(int)
        self.clips: dict[relax.Var, tuple[relax.Expr, float, float]] = {}

    def count_uses(self, func: relax.Function) -> None:
        for block in func.body.blocks:
            for binding in block.bindings:
                for var in relax.analysis.free_vars(binding.value):
                    self.uses[var] += 1
        for var in relax.analysis.free_vars(func.body.body):
            self.uses[var] += 1

    def _as_bound(self, call: relax.Call) -> tuple[relax.Expr, float, float] | None:
        if not isinstance(call, relax.Call) or call.op != tvm.ir.Op.get("relax.call_tir"):
            return None
        callee, args = call.args[0], call.args[1]
        if (
            not isinstance(callee, tvm.ir.GlobalVar)
            or not isinstance(args, relax.Tuple)
            or len(args.fields) != 2
        ):
            return None
        func = self.mod[callee]
        kind = _elementwise_bound(func) if isinstance(func, tirx.PrimFunc) else None
        value = _scalar(args.fields[1])
        data = args.fields[0]
        if kind is None or value is None or str(data.ty.dtype) != "float32":
            return None
        return (data, value, np.inf) if kind == "max" else (data, -np.inf, value)

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        found = self._as_bound(binding.value)
        if found is None:
            super().visit_var_binding_(binding)
            return
        data, low, high = found
        inner = self.clips.get(data) if isinstance(data, relax.Var) else None
        if inner is not None and self.uses[data] == 1:
            data, low, high = inner[0], max(low, inner[1]), min(high, inner[2])
        self.clips[binding.var] = (data, low, high)
        clipped = relax.op.clip(self.visit_expr(data), low, high)
        self.builder_.emit_normalized(relax.VarBinding(binding.var, self.builder_.normalize(clipped)))


@tvm.transform.module_pass(opt_level=0, name="CanonicalizeClip")
class CanonicalizeClip:
    """Rewrite ``main``'s TE max/min-against-a-constant calls as ``relax.clip`` (see module docstring)."""

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        flat = relax.transform.ToNonDataflow()(mod)
        rewriter = _ClipRewriter(flat)
        rewriter.count_uses(flat["main"])
        func = rewriter.visit_expr(flat["main"])
        result = rewriter.builder_.get()
        result["main"] = func
        result = relax.transform.ConvertToDataflow()(result)
        return relax.transform.DeadCodeElimination(["main"])(result)


__all__ = ["CanonicalizeClip"]
