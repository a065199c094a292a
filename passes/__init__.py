"""Relax passes of the OHQ pipeline; each drops into ``tvm.transform.Sequential``."""

from .annotate import CANDIDATES_ATTR, AnnotateCandidates, candidates
from .layer_id import LAYERS_ATTR, AssignLayerIds, layer_id_of

__all__ = [
    "CANDIDATES_ATTR",
    "LAYERS_ATTR",
    "AnnotateCandidates",
    "AssignLayerIds",
    "candidates",
    "layer_id_of",
]
