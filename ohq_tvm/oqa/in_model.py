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
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from ..board import Board
from ..board.session import LatencyStats
from ..build.toolchain import find_toolchain
from ..errors import BoardError
from ..frontend import ImportedModel, synthetic_inputs
from ..precision import Precision
from .cost import plan_latency
from .database import LatencyDatabase
from .quiet import QuietGate, canary_executable, canary_probe
from .workloads import ModelWorkloads

K = TypeVar("K")

# A scale outside these bounds means the parts and the whole disagree beyond what cache temperature
# explains (a measurement taken while the board was busy, say): it is clamped, and reported as clamped.
SCALE_BOUNDS = (0.25, 4.0)
# Whole-model timings per plan, interleaved: each of ``repeat`` x ``min_repeat_ms`` (the parts' config).
ROUNDS = 5


@dataclass(frozen=True)
class UniformRun:
    """One uniform plan: its measured end-to-end latency and the predicted parts it is compared with."""

    precision: Precision
    measured_ms: float
    layers_ms: float  # the layers' measured latencies, summed
    other_ms: float  # conversions and glue
    reused: bool = False

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

    def to_json(self) -> dict:
        return {
            "precision": self.precision.value,
            "measured_ms": self.measured_ms,
            "parts_ms": self.layers_ms + self.other_ms,
            "layers_ms": self.layers_ms,
            "other_ms": self.other_ms,
            "scale": self.scale,
            "clamped": self.clamped,
            "reused": self.reused,
        }


@dataclass
class InModelScales:
    """The factor on each precision's layer latencies, from the uniform plans timed whole."""

    runs: dict[Precision, UniformRun]

    @property
    def scales(self) -> dict[Precision, float]:
        return {p: run.scale for p, run in self.runs.items()}

    def apply(self, workloads: ModelWorkloads, latencies_ms: Mapping[str, float]) -> dict[str, float]:
        """``latencies_ms`` with every layer workload scaled by its precision's factor (1 without one)."""
        scaled = dict(latencies_ms)
        for options in workloads.layers.values():
            for precision, workload in options.items():
                if workload.key in latencies_ms:
                    scaled[workload.key] = latencies_ms[workload.key] * self.scales.get(precision, 1.0)
        return scaled

    def describe(self) -> str:
        return ", ".join(
            f"{p.value} x{run.scale:.2f} ({run.layers_ms + run.other_ms:.3g} ms parts, "
            f"{run.measured_ms:.3g} ms whole{', clamped' if run.clamped else ''})"
            for p, run in self.runs.items()
        )

    def to_json(self) -> dict:
        return {p.value: run.to_json() for p, run in self.runs.items()}


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


def time_uniform_plans(
    imported: ImportedModel,
    spec,
    board: Board,
    workloads: ModelWorkloads,
    latencies_ms: Mapping[str, float],
    database: LatencyDatabase,
    fingerprint: str,
    schedule: str,
    *,
    build_schedule: str = "default",
    tuning=None,
    repeat: int = 5,
    min_repeat_ms: int = 40,
    session_timeout_s: float = 300.0,
    gate: QuietGate | None = None,
    progress: Callable[[str], None] | None = None,
) -> InModelScales:
    """Build and time each uniform plan of ``imported`` whole on ``board`` (those stored under this board,
    model and ``schedule`` label are reused) and return the scales. Every part of those plans must be in
    ``latencies_ms``. Raises :class:`~ohq_tvm.errors.BoardError` when the board fails twice in a row on a
    plan (nothing of this call is stored then). ``gate``: the :class:`~.quiet.QuietGate` of the parts'
    measurement, so the whole models are timed at the speed the parts were (default: a new one)."""
    from ..build.module import build_executable
    from ..calibration import calibrate
    from ..layers import quantizable_layers
    from ..passes.apply_plan import ApplyPlan
    from ..plan import Plan

    gate = gate or QuietGate(enabled=board.emulation is None)
    key = model_key(imported)
    layers = quantizable_layers(imported.mod)
    parts = {}
    for precision in uniform_precisions(workloads):
        predicted = plan_latency(workloads, Plan.uniform(layers, precision).assignments, latencies_ms)
        parts[precision] = (predicted.by_kind().get("layer", 0.0), predicted.total_ms)
    stored = {p: database.model_run(fingerprint, key, schedule, p.value) for p in parts}
    missing = [p for p, stats in stored.items() if stats is None]
    if missing:
        toolchain = find_toolchain(spec.cross_triple)
        calibration = None
        with tempfile.TemporaryDirectory(prefix="ohq-tvm-whole-") as scratch:
            libraries = {}
            for precision in missing:
                if precision.is_integer and calibration is None:
                    # The values do not change the kernels: a quick synthetic calibration will do.
                    calibration = calibrate(imported, "minmax", num_samples=2)
                mod = ApplyPlan(
                    Plan.uniform(layers, precision), calibration if precision.is_integer else None
                )(imported.mod)
                if progress is not None:
                    progress(f"building the uniform {precision.value} plan whole")
                libraries[precision] = Path(scratch) / f"whole_{precision.value}.so"
                build_executable(mod, spec, build_schedule, tuning).export_library(
                    str(libraries[precision]), fcompile=toolchain.fcompile()
                )
            timed = time_whole_models(
                board, spec, libraries, imported, repeat, min_repeat_ms, gate, session_timeout_s
            )
        for precision, stats in timed.items():
            database.record_model_run(fingerprint, key, schedule, precision.value, stats)
            stored[precision] = stats
    runs = {}
    for precision, (layers_ms, total_ms) in parts.items():
        run = UniformRun(
            precision, stored[precision].median_ms, layers_ms, total_ms - layers_ms, precision not in missing
        )
        runs[precision] = run
        if progress is not None:
            progress(
                f"uniform {precision.value}: {run.measured_ms:.3f} ms whole on the board, parts "
                f"{total_ms:.3f} ms{' (stored)' if run.reused else ''}"
            )
    return InModelScales(runs)


def measured_scales(
    measurer,
    imported: ImportedModel,
    workloads: ModelWorkloads,
    progress: Callable[[str], None] | None = None,
) -> InModelScales:
    """:func:`time_uniform_plans` with what a :class:`~.measure.Measurer` that measured the parts knows:
    its board, database, schedule, timing and quiet gate."""
    return time_uniform_plans(
        imported,
        measurer.spec,
        measurer.board,
        workloads,
        measurer.latencies(workloads.unique()),
        measurer.database,
        measurer.fingerprint,
        measurer.schedule,
        build_schedule=measurer.build_schedule,
        tuning=measurer.tuning,
        repeat=measurer.timing.repeat,
        min_repeat_ms=measurer.timing.min_repeat_ms,
        gate=measurer.gate,
        progress=progress,
    )


def time_with_measurer(
    measurer, libraries: Mapping[K, Path], imported: ImportedModel, rounds: int = ROUNDS
) -> dict[K, LatencyStats]:
    """:func:`time_whole_models` on the board, with the timing and quiet gate of the
    :class:`~.measure.Measurer` that measured the parts (so wholes and parts are timed alike)."""
    return time_whole_models(
        measurer.board,
        measurer.spec,
        libraries,
        imported,
        measurer.timing.repeat,
        measurer.timing.min_repeat_ms,
        measurer.gate,
        rounds=rounds,
    )


def time_whole_models(
    board: Board,
    spec,
    libraries: Mapping[K, Path],
    imported: ImportedModel,
    repeat: int,
    min_repeat_ms: int,
    gate: QuietGate,
    session_timeout_s: float = 300.0,
    rounds: int = ROUNDS,
) -> dict[K, LatencyStats]:
    """Time exported builds of ``imported`` (by any key) on ``board``: ``rounds`` rounds, each timing every
    library once (so a slow spell hits them alike), in one session, each timing once ``gate`` finds the
    board quiet (and again, up to twice, when it slowed down meanwhile). A failed session is retried
    once; then the :class:`~ohq_tvm.errors.BoardError` is raised."""
    inputs = list(synthetic_inputs(imported.inputs).values())
    with tempfile.TemporaryDirectory(prefix="ohq-tvm-canary-") as scratch:
        canary = Path(scratch) / "canary.so"
        canary_executable(spec.tvm_target()).export_library(
            str(canary), fcompile=find_toolchain(spec.cross_triple).fcompile()
        )
        for attempt in range(2):
            try:
                session = board.connect(session_timeout_s=session_timeout_s)
                vms = {key: session.load_vm(path) for key, path in libraries.items()}
                probe = (
                    canary_probe(session.load_library(canary), session.device, session._guard)
                    if gate.enabled
                    else None
                )
                repeats = {key: [] for key in libraries}
                for _ in range(rounds):
                    for key, vm in vms.items():
                        stats, _ = gate.time(
                            probe, lambda vm=vm: vm.time(inputs, repeat=repeat, min_repeat_ms=min_repeat_ms)
                        )
                        repeats[key] += stats.repeats_ms
                return {key: LatencyStats(tuple(r)) for key, r in repeats.items()}
            except BoardError:
                if attempt:
                    raise
            finally:
                vms = session = probe = None  # release the session: a board may serve one at a time
    raise AssertionError("unreachable")


__all__ = [
    "InModelScales",
    "UniformRun",
    "measured_scales",
    "model_key",
    "time_uniform_plans",
    "time_whole_models",
    "time_with_measurer",
    "uniform_precisions",
]
