"""From a plan to a rewritten module: make or load the plan, calibrate what it quantizes, apply it with
``ApplyPlan``, and write ``plan.json``, ``calibration.json`` and the ONNX QDQ twin (``model.qdq.onnx``)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import onnx
import tvm

from .calibration import Calibration, calibrate
from .errors import PlanError
from .frontend import ImportedModel
from .layers import quantizable_layers
from .passes import AnnotateCandidates, ApplyPlan, candidates
from .plan import Plan
from .precision import Precision
from .qdq import export_qdq
from .samples import load_samples
from .targets import BoardSpec


@dataclass
class Rewritten:
    """The rewritten module, the plan it follows, its calibration and its QDQ export (model and path)."""

    mod: tvm.IRModule
    plan: Plan
    calibration: Calibration | None
    qdq: onnx.ModelProto
    qdq_path: Path

    @property
    def quantized(self) -> bool:
        return any(p is not Precision.FP32 for p in self.plan.assignments.values())


def rewrite_for_plan(
    imported: ImportedModel,
    board: BoardSpec,
    out_dir: Path,
    *,
    precision: Precision | str | None = None,
    plan: Plan | str | os.PathLike | None = None,
    method: str = "minmax",
    samples_path: str | os.PathLike | None = None,
    normalization: str = "imagenet",
    synthetic: str = "gaussian",
    seed: int = 0,
    say: Callable[[str], None] = lambda _message: None,
) -> Rewritten:
    """Make (uniform ``precision``) or load (``plan``: object or JSON path) the plan, calibrate, rewrite,
    and write the plan, calibration and QDQ files into ``out_dir``.

    Raises :class:`PlanError` for a plan of another model, a plan that does not fit the model's layers or
    the board's candidates, or both/neither of ``precision`` and ``plan``; calibration errors for
    unreadable samples.
    """
    layers = quantizable_layers(imported.mod)
    if (plan is None) == (precision is None):
        raise PlanError("give a precision or a plan (one of them)")
    if plan is not None:
        chosen = plan if isinstance(plan, Plan) else Plan.load(plan)
        if chosen.model_sha256 and chosen.model_sha256 != imported.sha256:
            raise PlanError(
                f"the plan was made for another model (sha256 {chosen.model_sha256[:12]}…, "
                f"this one is {imported.sha256[:12]}…)"
            )
    else:
        chosen = Plan.uniform(layers, precision, model_sha256=imported.sha256, target=board.name)
    annotated = AnnotateCandidates(board, pin_first_last=False)(imported.mod)
    chosen.validate_against(layers, candidates(annotated))
    calibration = None
    if any(p.is_integer for p in chosen.assignments.values()):
        samples = load_samples(samples_path, imported.inputs, normalization) if samples_path else None
        calibration = calibrate(imported, method, samples=samples, synthetic=synthetic, seed=seed)
        chosen.calibration = method
        say(f"calibrated {len(calibration.ranges)} layer inputs ({method}, {calibration.source})")
    mod = ApplyPlan(chosen, calibration)(annotated)
    chosen.save(out_dir / "plan.json")
    if calibration is not None:
        calibration.save(out_dir / "calibration.json")
    qdq_path = out_dir / "model.qdq.onnx"
    qdq = export_qdq(imported, chosen, calibration, qdq_path)
    say(f"applied plan: {chosen.counts_text()}")
    return Rewritten(mod, chosen, calibration, qdq, qdq_path)


__all__ = ["Rewritten", "rewrite_for_plan"]
