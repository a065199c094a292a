"""The uniform plans timed whole on the board, and the per-precision scale they give the measured parts.

A kernel timed alone (weights and output flushed from the caches, input warm: :mod:`.kernel_timing`) does
not meet the cache it meets inside the model. How far off that is depends on the precision: on the 2-core
host, timed while the board runs at its usual speed (:mod:`.quiet`), the parts of uniform int8
MobileNetV2 add up to 1.32x the whole model, those of fp32 to 1.09x (likely: an int8 model's weights stay
in the last-level cache from one run to the next; most of an fp32 model's do not). A sum of parts then
overcharges integer layers, and a budget relative to the uniform int8 plan (``latency=1.1*int8``) is
relative to a number the board never ran.

So after the parts are measured, each uniform plan (fp32, and every lower precision all layers have) is
built whole, timed on the board (same timer and quiet gate as the parts, the plans in interleaved rounds)
and stored in the database (``model_runs``).
For precision ``p`` the layers' latencies are then scaled by

    s_p = (whole_p - conversions_p - glue) / layers_p

so that the composition of :mod:`.cost`, applied to the scaled latencies, gives each uniform plan exactly
its measured latency; a mixed plan is predicted with each layer scaled by its own precision's factor. The
composition stays linear, and so does the integer program. Conversions and glue are not scaled.

Before planning on them, the numbers are checked against each other. A uniform plan whose factor falls
outside :data:`SCALE_BOUNDS` (its parts and its whole disagree beyond what cache temperature explains),
whose whole-model repeats spread more than :data:`SPREAD_BOUND` of their median, or whose median was
timed while the canary said the board was slow (:mod:`.quiet`) is timed again, once: the slowest parts
of each plan whose factor fell outside the bounds (:func:`outlier_parts`), then every uniform plan whole,
in the same session conditions. What still disagrees then is returned as the reasons the timing is
unreliable (:attr:`InModelScales.unreliable`), and every row measured since the run began is marked in
the database, so that the next run times it again instead of reusing it.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from ..frontend import ImportedModel
from ..precision import Precision
from .cost import conversion_ms, measured, plan_latency
from .database import LatencyDatabase
from .whole_model import UniformBuilds, WholeTiming
from .workloads import ModelWorkloads, Workload

# A scale outside these bounds means the parts and the whole disagree beyond what cache temperature
# explains (a measurement taken while the board was busy, say): it is clamped, timed again, and reported.
SCALE_BOUNDS = (0.25, 4.0)
# A uniform plan's whole-model repeats whose interquartile range exceeds this share of their median
# straddle a slow spell: on the quiet 2-core host they stay within 9% (benchmarks/results/
# oqa_composition.json); a spell 1.78x slower that takes a quarter to three quarters of them gives ~78%.
SPREAD_BOUND = 0.25
# The parts timed again when a plan's factor falls outside the bounds: its slowest, until they make up
# this share of its parts' sum, at most MAX_OUTLIERS of them.
OUTLIER_SHARE = 0.8
MAX_OUTLIERS = 16


@dataclass(frozen=True)
class UniformRun:
    """One uniform plan: its measured end-to-end latency and the predicted parts it is compared with."""

    precision: Precision
    measured_ms: float
    layers_ms: float  # the layers' measured latencies, summed
    other_ms: float  # conversions and glue
    reused: bool = False
    spread_ms: float = 0.0  # interquartile range of the whole-model repeats
    slow_timings: int = 0  # whole-model timings that ended with the board slower than its usual speed
    timings: int = 0

    @property
    def parts_ms(self) -> float:
        return self.layers_ms + self.other_ms

    @property
    def raw_scale(self) -> float:
        return (self.measured_ms - self.other_ms) / self.layers_ms if self.layers_ms > 0 else 1.0

    @property
    def scale(self) -> float:
        low, high = SCALE_BOUNDS
        return min(max(self.raw_scale, low), high)

    @property
    def clamped(self) -> bool:
        return self.scale != self.raw_scale

    def problems(self) -> list[str]:
        """Why this plan's numbers cannot be planned on, each naming them (none: they can)."""
        name = f"uniform {self.precision.value}"
        found = []
        if self.clamped:
            low, high = SCALE_BOUNDS
            ratio = self.parts_ms / self.measured_ms
            found.append(
                f"{name}: its parts add up to {self.parts_ms:.3g} ms, {ratio:.2g}x "
                f"the {self.measured_ms:.3g} ms it measures whole (in-model factor {self.raw_scale:.2f}, "
                f"outside {low:g}-{high:g})"
            )
        if self.spread_ms > SPREAD_BOUND * self.measured_ms:
            found.append(
                f"{name}: its whole-model timings spread {self.spread_ms / self.measured_ms:.0%} of their "
                f"{self.measured_ms:.3g} ms median (interquartile range; bound {SPREAD_BOUND:.0%})"
            )
        if self.slow_timings * 2 > self.timings > 0:
            found.append(
                f"{name}: {self.slow_timings} of its {self.timings} whole-model timings ended with the board "
                "slower than its usual speed (the quiet gate did not wait it out)"
            )
        return found

    def to_json(self) -> dict:
        return {
            "precision": self.precision.value,
            "measured_ms": self.measured_ms,
            "parts_ms": self.parts_ms,
            "layers_ms": self.layers_ms,
            "other_ms": self.other_ms,
            "scale": self.scale,
            "raw_scale": self.raw_scale,
            "clamped": self.clamped,
            "spread_ms": self.spread_ms,
            "slow_timings": self.slow_timings,
            "timings": self.timings,
            "reused": self.reused,
        }


@dataclass
class InModelScales:
    """The factor on each precision's layer latencies, from the uniform plans timed whole, and whether
    those timings can be trusted (see the module docstring)."""

    runs: dict[Precision, UniformRun]
    unreliable: tuple[str, ...] = ()  # why the numbers still contradict each other after timing again
    retimed_because: tuple[str, ...] = ()  # what made them be timed again (empty: nothing)
    retimed_ms: dict[str, float] = field(default_factory=dict)  # parts timed again then (ms, by key)
    marked_rows: int = 0  # rows marked in the database as unreliable

    @property
    def scales(self) -> dict[Precision, float]:
        return {p: run.scale for p, run in self.runs.items()}

    @property
    def retimed_parts(self) -> int:
        return len(self.retimed_ms)

    def apply(self, workloads: ModelWorkloads, latencies_ms: Mapping[str, float]) -> dict[str, float]:
        """``latencies_ms`` with every layer workload scaled by its precision's factor (1 without one).
        A conversion fused into a layer keeps what it adds to the layer unscaled, as the factors were
        fitted (conversions and glue are not scaled)."""
        scaled = dict(latencies_ms)
        for options in workloads.layers.values():
            for precision, workload in options.items():
                if workload.key in latencies_ms:
                    scaled[workload.key] = latencies_ms[workload.key] * self.scales.get(precision, 1.0)
        for table in (workloads.quantize, workloads.dequantize):
            for workload in table.values():
                layer = workload.fused_layer
                if layer is not None and measured(workload, latencies_ms):
                    scaled[workload.key] = scaled[layer.key] + conversion_ms(workload, latencies_ms)
        return scaled

    def describe(self) -> str:
        return ", ".join(
            f"{p.value} x{run.scale:.2f} ({run.parts_ms:.3g} ms parts, "
            f"{run.measured_ms:.3g} ms whole{', clamped' if run.clamped else ''})"
            for p, run in self.runs.items()
        )

    def unreliable_text(self) -> str | None:
        """One sentence for a warning: what contradicts what, and what was done about it (or None)."""
        if not self.unreliable:
            return None
        retimed = f"{self.retimed_parts} part(s) and " if self.retimed_parts else ""
        return (
            f"the board's timings contradict each other: {'; '.join(self.unreliable)} (after timing "
            f"{retimed}the uniform plans whole again); the plan rests on these numbers, rerun on a quiet "
            f"board ({self.marked_rows} row(s) measured in this run are marked to be timed again)"
        )

    def to_json(self) -> dict:
        return {p.value: run.to_json() for p, run in self.runs.items()}

    def check_json(self) -> dict:
        """The reliability check: its bounds, what made it time again, what still disagrees."""
        return {
            "bounds": {"scale": list(SCALE_BOUNDS), "spread_of_median": SPREAD_BOUND},
            "retimed_because": list(self.retimed_because),
            "retimed_parts": self.retimed_parts,
            "unreliable": list(self.unreliable),
            "marked_rows": self.marked_rows,
        }


def model_key(imported: ImportedModel) -> str:
    """The model as built: its ONNX bytes and the static input shapes it was imported with."""
    shapes = [(spec.name, list(spec.shape), str(spec.dtype)) for spec in imported.inputs]
    text = imported.sha256 + json.dumps(shapes)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def uniform_precisions(workloads: ModelWorkloads) -> list[Precision]:
    """fp32 and every precision each layer has a candidate in (the plans that can be built uniform)."""
    found = {p for options in workloads.layers.values() for p in options}
    return sorted(
        (p for p in found if all(p in options for options in workloads.layers.values())),
        key=lambda p: (p is not Precision.FP32, p.value),
    )


# Times the uniform plans of the given precisions whole on the board (as :class:`UniformBuilds` does).
WholeTimer = Callable[[Sequence[Precision]], Mapping[Precision, WholeTiming]]
# Times the given parts again on the board (replacing their rows); returns their latencies (ms, by key).
PartTimer = Callable[[Sequence[Workload]], Mapping[str, float]]


def outlier_parts(
    workloads: ModelWorkloads, precision: Precision, latencies_ms: Mapping[str, float]
) -> list[Workload]:
    """The parts of the uniform ``precision`` plan most likely to carry a disagreement with the whole:
    the slowest (distinct) ones, until they make up :data:`OUTLIER_SHARE` of its parts' sum, at most
    :data:`MAX_OUTLIERS`; with each chosen layer, the conversions fused into it (what they add to the
    layer is a difference of two timings, which must be taken under the same conditions)."""
    plan = dict.fromkeys(workloads.layers, precision)
    found: dict[str, Workload] = {}
    share_ms: dict[str, float] = {}  # a workload the plan runs more than once weighs that much more
    for _, workload, ms in plan_latency(workloads, plan, latencies_ms).parts:
        found[workload.key] = workload
        share_ms[workload.key] = share_ms.get(workload.key, 0.0) + ms
    total_ms = sum(share_ms.values())
    chosen, covered_ms = [], 0.0
    for key in sorted(share_ms, key=lambda k: -share_ms[k]):
        if covered_ms >= OUTLIER_SHARE * total_ms or len(chosen) == MAX_OUTLIERS:
            break
        chosen.append(found[key])
        covered_ms += share_ms[key]
    layers = {w.key for w in chosen if w.kind == "layer"}
    fused = {
        w.key: w
        for table in (workloads.quantize, workloads.dequantize)
        for w in table.values()
        if w.fused_layer is not None and w.fused_layer.key in layers
    }
    chosen_keys = {w.key for w in chosen}
    return chosen + [w for key, w in fused.items() if key not in chosen_keys]


def time_uniform_plans(
    workloads: ModelWorkloads,
    latencies_ms: Mapping[str, float],
    database: LatencyDatabase,
    fingerprint: str,
    model: str,
    schedule: str,
    time_whole: WholeTimer,
    *,
    time_parts: PartTimer | None = None,
    measured_since: float | None = None,
    progress: Callable[[str], None] | None = None,
) -> InModelScales:
    """The in-model scales of ``model`` (a :func:`model_key`) on the board ``fingerprint``.

    Each uniform plan's whole-model timing comes from the database (board, model, ``schedule`` label,
    plan) unless missing or marked unreliable, else from ``time_whole`` (stored as it comes). Every part
    of those plans must be in ``latencies_ms``. When the numbers contradict each other (see the module
    docstring) the outlier parts are timed again with ``time_parts`` (when given) and every uniform plan
    with ``time_whole``, once; what still contradicts is returned in ``unreliable``, and the rows of this
    board and schedule measured since ``measured_since`` (default: this call) are marked unreliable.
    Raises :class:`~ohq_tvm.errors.BoardError` when the board fails (what was stored stays)."""
    started = time.time() if measured_since is None else measured_since
    latencies = dict(latencies_ms)
    precisions = uniform_precisions(workloads)
    timed: dict[Precision, WholeTiming] = {}
    for precision in precisions:
        stats = database.model_run(fingerprint, model, schedule, precision.value)
        if stats is not None:
            timed[precision] = WholeTiming(stats)
    reused = set(timed)

    def time_and_store(which: Sequence[Precision]) -> None:
        for precision, timing in time_whole(which).items():
            database.record_model_run(fingerprint, model, schedule, precision.value, timing.stats)
            timed[precision] = timing

    if len(reused) < len(precisions):
        time_and_store([p for p in precisions if p not in reused])
    runs = _uniform_runs(workloads, latencies, timed, reused)
    first = tuple(text for run in runs.values() for text in run.problems())
    outliers: list[Workload] = []
    retimed_ms: dict[str, float] = {}
    if first:
        if time_parts is not None:
            clamped = [p for p, run in runs.items() if run.clamped]
            found = {w.key: w for p in clamped for w in outlier_parts(workloads, p, latencies)}
            outliers = list(found.values())
        if progress is not None:
            progress(
                f"the timings disagree ({'; '.join(first)}): timing "
                + (f"{len(outliers)} part(s) and " if outliers else "")
                + "the uniform plans whole again"
            )
        if outliers:
            retimed_ms = dict(time_parts(outliers))
            latencies.update(retimed_ms)
        time_and_store(precisions)
        runs = _uniform_runs(workloads, latencies, timed, reused=set())
    unreliable = tuple(text for run in runs.values() for text in run.problems())
    marked = 0
    if unreliable:
        marked = database.mark_unreliable(fingerprint, schedule, started, "; ".join(unreliable))
    if progress is not None:
        for run in runs.values():
            progress(
                f"uniform {run.precision.value}: {run.measured_ms:.3f} ms whole on the board, parts "
                f"{run.parts_ms:.3f} ms{' (stored)' if run.reused else ''}"
            )
    return InModelScales(runs, unreliable, first, retimed_ms, marked)


def _uniform_runs(
    workloads: ModelWorkloads,
    latencies_ms: Mapping[str, float],
    timed: Mapping[Precision, WholeTiming],
    reused: set[Precision],
) -> dict[Precision, UniformRun]:
    runs = {}
    for precision in uniform_precisions(workloads):
        timing = timed[precision]
        parts = plan_latency(workloads, dict.fromkeys(workloads.layers, precision), latencies_ms)
        layers_ms = parts.by_kind().get("layer", 0.0)
        runs[precision] = UniformRun(
            precision,
            timing.stats.median_ms,
            layers_ms,
            parts.total_ms - layers_ms,
            reused=precision in reused,
            spread_ms=timing.stats.spread_ms,
            slow_timings=timing.slow_timings,
            timings=timing.timings,
        )
    return runs


def measured_scales(
    measurer,
    imported: ImportedModel,
    workloads: ModelWorkloads,
    progress: Callable[[str], None] | None = None,
    measured_since: float | None = None,
) -> InModelScales:
    """:func:`time_uniform_plans` with what a :class:`~.measure.Measurer` that measured the parts knows:
    its board, database, schedule, timing and quiet gate (parts timed again are timed by it too)."""

    def time_parts(parts: Sequence[Workload]) -> Mapping[str, float]:
        measurer.run(parts, retime=True)
        return measurer.latencies(parts)

    with UniformBuilds.from_measurer(measurer, imported, progress) as builds:
        return time_uniform_plans(
            workloads,
            measurer.latencies(workloads.unique()),
            measurer.database,
            measurer.fingerprint,
            model_key(imported),
            measurer.schedule,
            builds.time,
            time_parts=time_parts,
            measured_since=measured_since,
            progress=progress,
        )


__all__ = [
    "MAX_OUTLIERS",
    "OUTLIER_SHARE",
    "SCALE_BOUNDS",
    "SPREAD_BOUND",
    "InModelScales",
    "UniformRun",
    "measured_scales",
    "model_key",
    "outlier_parts",
    "time_uniform_plans",
    "uniform_precisions",
]
