"""Record, per layer, the precisions the board can run it in."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import tvm

from ohq_tvm.errors import OHQError
from ohq_tvm.precision import Precision

from .layer_id import LAYERS_ATTR, check_not_lowered, layer_bindings, layer_id_of

CANDIDATES_ATTR = "ohq_candidates"


@tvm.transform.module_pass(opt_level=0, name="AnnotateCandidates")
class AnnotateCandidates:
    """Write ``ohq_candidates`` = {layer_id: [precision, ...]} on ``main``.

    ``board_or_precisions`` is a :class:`~ohq_tvm.targets.BoardSpec` or a list of precisions. Every layer
    may run in each precision the board computes natively (``board.precisions``: fp32 always,
    fp16 only where the board lists it, int8, int4w). Pinned layers get exactly one candidate:
    ``pinned`` maps layer ids or ONNX node names to a precision, and ``pin_first_last`` keeps the first and
    last layer in fp32 (the usual guard for accuracy at the network's edges) unless ``pinned`` says
    otherwise. Needs layer ids (``AssignLayerIds``); a module with no layers is returned unchanged.
    Raises :class:`OHQError` for a pinned name that is not a layer, a pinned precision the board
    lacks, or a module whose layers ``LegalizeOps`` has already lowered to TIR.
    """

    def __init__(
        self,
        board_or_precisions: object | Iterable[Precision | str],
        pinned: Mapping[str, Precision | str] | None = None,
        pin_first_last: bool = True,
    ) -> None:
        # A BoardSpec (anything with .precisions), or the precisions themselves.
        precisions = getattr(board_or_precisions, "precisions", board_or_precisions)
        allowed = [Precision.parse(str(p)) for p in precisions]
        self.precisions = tuple(dict.fromkeys([Precision.FP32, *allowed]))
        self.pinned = {name: Precision.parse(str(p)) for name, p in (pinned or {}).items()}
        self.pin_first_last = pin_first_last

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        check_not_lowered(mod, "AnnotateCandidates")
        func = mod["main"]
        ids = [layer_id_of(b.var) for b in layer_bindings(func)]
        if not ids:
            return mod
        if any(layer_id is None for layer_id in ids):
            raise OHQError("AnnotateCandidates needs layer ids: run AssignLayerIds first")
        onnx_names = dict(func.attrs[LAYERS_ATTR]) if func.attrs and LAYERS_ATTR in func.attrs else {}
        by_name = {str(onnx): layer for layer, onnx in onnx_names.items() if str(onnx)}
        fixed: dict[str, Precision] = {}
        if self.pin_first_last:
            fixed[ids[0]] = fixed[ids[-1]] = Precision.FP32
        for name, precision in self.pinned.items():
            layer = name if name in ids else by_name.get(name)
            if layer is None:
                raise OHQError(
                    f"pinned layer {name!r} is not a layer of this model; layers: {', '.join(ids)}"
                )
            if precision not in self.precisions:
                allowed = ", ".join(p.value for p in self.precisions)
                raise OHQError(f"layer {name!r} is pinned to {precision}, which the board lacks ({allowed})")
            fixed[layer] = precision
        table = {
            layer: [fixed[layer].value] if layer in fixed else [p.value for p in self.precisions]
            for layer in ids
        }
        updated = mod.clone() if hasattr(mod, "clone") else tvm.IRModule(dict(mod.functions), attrs=mod.attrs)
        updated["main"] = func.with_attr(CANDIDATES_ATTR, table)
        return updated


def candidates(mod: tvm.IRModule) -> dict[str, tuple[Precision, ...]]:
    """Read back ``ohq_candidates``; empty when the module was not annotated."""
    func = mod["main"]
    if not func.attrs or CANDIDATES_ATTR not in func.attrs:
        return {}
    return {
        str(layer): tuple(Precision(str(p)) for p in options)
        for layer, options in func.attrs[CANDIDATES_ATTR].items()
    }
