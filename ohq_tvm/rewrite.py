"""From a plan to a rewritten module: make or load the plan, calibrate what it quantizes, apply it with
``ApplyPlan``, and write ``plan.json``, ``calibration.json`` and the ONNX QDQ twin (``model.qdq.onnx``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import onnx
import tvm

from .calibration import Calibration, calibrate
from .config import CalibrationConfig
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
    spec: BoardSpec,
    out_dir: Path,
    calibration: CalibrationConfig,
    *,
    precision: Precision | None = None,
    plan: Plan | None = None,
    seed: int = 0,
    say: Callable[[str], None] = lambda _message: None,
) -> Rewritten:
    """Make (uniform ``precision``) or take (``plan``) the plan for a board of kind ``spec``, calibrate
    its integer layers as ``calibration`` says, rewrite, and write the plan, calibration and QDQ files
    into ``out_dir``.

    Raises :class:`PlanError` for a plan of another model, a plan that does not fit the model's layers or
    the board's candidates, or both/neither of ``precision`` and ``plan``; calibration errors for
    unreadable samples.
    """
    layers = quantizable_layers(imported.mod)
    if (plan is None) == (precision is None):
        raise PlanError("give a precision or a plan (one of them)")
    if plan is not None:
        chosen = plan
        if chosen.model_sha256 and chosen.model_sha256 != imported.sha256:
            raise PlanError(
                f"the plan was made for another model (sha256 {chosen.model_sha256[:12]}…, "
                f"this one is {imported.sha256[:12]}…)"
            )
    else:
        chosen = Plan.uniform(layers, precision, model_sha256=imported.sha256, target=spec.name)
    annotated = AnnotateCandidates(spec, pin_first_last=False)(imported.mod)
    chosen.validate_against(layers, candidates(annotated))
    calibrated = None
    if any(p.is_integer for p in chosen.assignments.values()):
        samples = (
            load_samples(calibration.samples, imported.inputs, calibration.normalization)
            if calibration.samples
            else None
        )
        calibrated = calibrate(
            imported, calibration.method, samples=samples, synthetic=calibration.synthetic, seed=seed
        )
        chosen.calibration = calibration.method
        say(f"calibrated {len(calibrated.ranges)} layer inputs ({calibration.method}, {calibrated.source})")
    mod = ApplyPlan(chosen, calibrated)(annotated)
    chosen.save(out_dir / "plan.json")
    if calibrated is not None:
        calibrated.save(out_dir / "calibration.json")
    qdq_path = out_dir / "model.qdq.onnx"
    qdq = export_qdq(imported, chosen, calibrated, qdq_path)
    say(f"applied plan: {chosen.counts_text()}")
    return Rewritten(mod, chosen, calibrated, qdq, qdq_path)


__all__ = ["Rewritten", "rewrite_for_plan"]
