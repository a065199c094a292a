"""Relax passes of the OHQ pipeline; each drops into ``tvm.transform.Sequential``."""

from .annotate import CANDIDATES_ATTR, AnnotateCandidates, candidates
from .apply_plan import PLAN_ATTR, ApplyPlan, applied_plan
from .canonicalize_clip import CanonicalizeClip
from .cpu_kernels import UseCPUKernels
from .layer_id import LAYERS_ATTR, AssignLayerIds, layer_id_of
from .mask import MASK_PARAM, InsertPrecisionMasks, mask_layout

__all__ = [
    "CANDIDATES_ATTR",
    "LAYERS_ATTR",
    "MASK_PARAM",
    "PLAN_ATTR",
    "AnnotateCandidates",
    "ApplyPlan",
    "AssignLayerIds",
    "CanonicalizeClip",
    "InsertPrecisionMasks",
    "UseCPUKernels",
    "applied_plan",
    "candidates",
    "layer_id_of",
    "mask_layout",
]
