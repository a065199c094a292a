"""A plan's latency on a board, from the latencies of its parts (see :mod:`.workloads`).

``latency(plan) = Σ layers at their precision + Σ quantize where an integer layer's input comes from
float + Σ dequantize where anything but an integer layer reads an integer layer + Σ glue``. The same
composition, written as linear terms, is what the solver minimises. A conversion the build fuses into a
layer costs what it adds to that layer (:func:`conversion_ms`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from ..errors import OHQError
from ..precision import Precision
from .workloads import ModelWorkloads, Workload


@dataclass
class PlanLatency:
    """Predicted latency of a plan, with every part that contributes (``(what, workload, ms)``)."""

    total_ms: float = 0.0
    parts: list[tuple[str, Workload, float]] = field(default_factory=list)

    def add(self, what: str, workload: Workload, latency_ms: float) -> None:
        self.parts.append((what, workload, latency_ms))
        self.total_ms += latency_ms

    def by_kind(self) -> dict[str, float]:
        totals: dict[str, float] = {}
        for _, workload, ms in self.parts:
            totals[workload.kind] = totals.get(workload.kind, 0.0) + ms
        return totals


def plan_parts(workloads: ModelWorkloads, assignments) -> list[tuple[str, Workload]]:
    """The workloads a plan runs, each with what it stands for (layer id, boundary, or glue op).

    ``assignments`` is a :class:`~ohq_tvm.plan.Plan` or a mapping of layer id to precision (or its name).
    """
    table = getattr(assignments, "assignments", assignments)
    assignments = {layer_id: Precision.parse(str(p)) for layer_id, p in table.items()}

    def is_integer(layer_id: str | None) -> bool:
        return layer_id is not None and assignments[layer_id].is_integer

    missing = [lid for lid in workloads.layers if lid not in assignments]
    if missing:
        raise OHQError(f"the plan gives no precision to layer(s) {', '.join(missing)}")
    parts: list[tuple[str, Workload]] = []
    quantized_sources: set[str] = set()
    for layer_id, options in workloads.layers.items():
        precision = assignments[layer_id]
        if precision not in options:
            raise OHQError(
                f"layer {layer_id!r} has no {precision} workload (candidates: {', '.join(options)})"
            )
        parts.append((layer_id, options[precision]))
        if not precision.is_integer:
            continue
        source = workloads.sources[layer_id]
        if not is_integer(workloads.producers[layer_id]) and source not in quantized_sources:
            quantized_sources.add(source)
            parts.append((f"{layer_id}:quantize", workloads.quantize[layer_id]))
        if any(not is_integer(reader) for reader in workloads.readers[layer_id]):
            parts.append((f"{layer_id}:dequantize", workloads.dequantize[layer_id]))
    parts.extend((workload.op, workload) for workload in workloads.glue)
    return parts


def conversion_ms(workload: Workload, latencies_ms: Mapping[str, float]) -> float:
    """What a ``quantize``/``dequantize`` part costs a plan: a standalone conversion its own latency; one
    fused into a layer (:attr:`~.workloads.Workload.fused_layer`) what it adds to the layer timed alone,
    which can be less than nothing (an integer layer writing float32 straight from its accumulator skips
    the requantize's rounding and clipping). Raises ``KeyError`` for a latency not in ``latencies_ms``."""
    layer = workload.fused_layer
    if layer is None:
        return latencies_ms[workload.key]
    return latencies_ms[workload.key] - latencies_ms[layer.key]


def part_ms(workload: Workload, latencies_ms: Mapping[str, float]) -> float:
    """A part's latency in a plan: a layer's or glue's own, a conversion's :func:`conversion_ms`."""
    if workload.kind in ("quantize", "dequantize"):
        return conversion_ms(workload, latencies_ms)
    return latencies_ms[workload.key]


def measured(workload: Workload, latencies_ms: Mapping[str, float]) -> bool:
    """Whether ``latencies_ms`` has what :func:`part_ms` needs for ``workload``."""
    layer = workload.fused_layer
    return workload.key in latencies_ms and (layer is None or layer.key in latencies_ms)


def plan_latency(workloads: ModelWorkloads, assignments, latencies_ms: Mapping[str, float]) -> PlanLatency:
    """Sum the measured parts of a plan. Raises :class:`OHQError` naming any part not yet measured."""
    result = PlanLatency()
    unmeasured = []
    for what, workload in plan_parts(workloads, assignments):
        if not measured(workload, latencies_ms):
            unmeasured.append(f"{what} ({workload.label})")
            continue
        result.add(what, workload, part_ms(workload, latencies_ms))
    if unmeasured:
        raise OHQError(f"{len(unmeasured)} part(s) of the plan are not measured: {', '.join(unmeasured[:5])}")
    return result


__all__ = ["PlanLatency", "conversion_ms", "measured", "part_ms", "plan_latency", "plan_parts"]
