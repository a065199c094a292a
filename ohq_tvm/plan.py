"""A mixed-precision plan: one precision per layer, plus where it came from. Typed, validated, JSON-able."""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import PlanError
from .jsonfile import read_json, write_json
from .layers import LayerInfo
from .precision import Precision

PLAN_FORMAT = "ohq-tvm/plan"
PLAN_VERSION = 1
CALIBRATION_METHODS = ("minmax", "percentile", "entropy")


@dataclass
class Plan:
    """``assignments`` maps layer ids to precisions; the rest records what the plan was made for.

    Validates itself on construction (precision names, calibration method, numbers); use
    :meth:`validate_against` to check it against a model's layers and a board's candidates.
    """

    assignments: dict[str, Precision]
    model_sha256: str = ""
    target: str = ""
    calibration: str | None = None
    source: str = "manual"  # "uniform", "ilp", "bops-proxy", "greedy", "manual", ...
    predicted: dict[str, float] = field(default_factory=dict)  # latency_ms, size_bytes, sensitivity
    notes: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.assignments, Mapping):
            raise PlanError("a plan's assignments must map layer ids to precisions")
        self.assignments = {str(k): Precision.parse(str(v)) for k, v in self.assignments.items()}
        if self.calibration is not None and self.calibration not in CALIBRATION_METHODS:
            methods = ", ".join(CALIBRATION_METHODS)
            raise PlanError(f"unknown calibration method {self.calibration!r}; use one of {methods}")
        if not isinstance(self.predicted, Mapping):
            raise PlanError(f"a plan's predicted numbers must map names to numbers, not {self.predicted!r}")
        for key, value in self.predicted.items():
            if not isinstance(value, (int, float)) or value != value:
                raise PlanError(f"predicted {key!r} must be a number, not {value!r}")

    @classmethod
    def uniform(cls, layers: Iterable[LayerInfo | str], precision: Precision | str, **meta: Any) -> Plan:
        """Every layer in one precision."""
        ids = [layer.layer_id if isinstance(layer, LayerInfo) else layer for layer in layers]
        return cls({layer_id: Precision.parse(str(precision)) for layer_id in ids}, source="uniform", **meta)

    def assign(self, layer_id: str, precision: Precision | str) -> None:
        """Set one layer's precision (parsed, so a misspelt name fails here, not at build time)."""
        self.assignments[layer_id] = Precision.parse(str(precision))

    def precision_of(self, layer_id: str) -> Precision:
        return self.assignments[layer_id]

    def counts(self) -> dict[str, int]:
        """How many layers each precision got."""
        tally: dict[str, int] = {}
        for precision in self.assignments.values():
            tally[precision.value] = tally.get(precision.value, 0) + 1
        return tally

    def counts_text(self, compact: bool = False) -> str:
        """The counts, most common precision first: ``"30 int8, 23 fp32"``, or ``"30xint8 23xfp32"``
        (``compact``, for table cells)."""
        counts = sorted(self.counts().items(), key=lambda item: (-item[1], item[0]))
        if compact:
            return " ".join(f"{n}x{precision}" for precision, n in counts)
        return ", ".join(f"{n} {precision}" for precision, n in counts)

    def validate_against(
        self, layers: Iterable[LayerInfo | str], candidates: Mapping[str, Iterable[Precision]] | None = None
    ) -> None:
        """Raise :class:`PlanError` for a layer id the model lacks (naming close matches), a layer the plan
        leaves out, or a precision not among the layer's candidates on the target."""
        ids = [layer.layer_id if isinstance(layer, LayerInfo) else layer for layer in layers]
        for layer_id in self.assignments:
            if layer_id not in ids:
                close = difflib.get_close_matches(layer_id, ids, n=3)
                hint = f"; did you mean {', '.join(close)}?" if close else f"; layers: {', '.join(ids)}"
                raise PlanError(f"plan names layer {layer_id!r}, which the model does not have{hint}")
        missing = [layer_id for layer_id in ids if layer_id not in self.assignments]
        if missing:
            raise PlanError(f"plan gives no precision for layer(s) {', '.join(missing)}")
        for layer_id, precision in self.assignments.items():
            allowed = tuple(candidates.get(layer_id, ())) if candidates else ()
            if candidates is not None and precision not in allowed:
                names = ", ".join(p.value for p in allowed) or "none"
                raise PlanError(
                    f"plan puts layer {layer_id!r} in {precision}, not allowed on "
                    f"{self.target or 'this target'} (allowed: {names})"
                )

    def to_json(self) -> dict[str, Any]:
        return {
            "format": PLAN_FORMAT,
            "format_version": PLAN_VERSION,
            "assignments": {k: v.value for k, v in self.assignments.items()},
            "model_sha256": self.model_sha256,
            "target": self.target,
            "calibration": self.calibration,
            "source": self.source,
            "predicted": dict(self.predicted),
            "notes": self.notes,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Plan:
        """The plan :meth:`to_json` wrote; :class:`PlanError` for anything else (another JSON value, another
        format or version, no ``assignments``)."""
        if not isinstance(data, Mapping):
            kind = {list: "a JSON list", str: "a JSON string"}.get(type(data), f"the JSON value {data!r}")
            raise PlanError(f"not an ohq-tvm plan ({kind}, not a JSON object)")
        if data.get("format") != PLAN_FORMAT:
            raise PlanError(f"not an ohq-tvm plan (format {data.get('format')!r})")
        if data.get("format_version") != PLAN_VERSION:
            raise PlanError(f"plan format version {data.get('format_version')} is not {PLAN_VERSION}")
        if "assignments" not in data:
            raise PlanError("the plan has no 'assignments' (a JSON object of layer id to precision)")
        fields = ("model_sha256", "target", "calibration", "source", "predicted", "notes")
        return cls(data["assignments"], **{k: data[k] for k in fields if k in data})

    def save(self, path: str | os.PathLike) -> Path:
        return write_json(path, self.to_json(), "plan", PlanError)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Plan:
        data = read_json(path, "plan", PlanError)
        try:
            return cls.from_json(data)
        except PlanError as err:
            raise PlanError(f"{path}: {err}") from None
