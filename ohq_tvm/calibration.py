"""Activation ranges for integer layers: observe each layer's input on sample data, pick a range per method.

Calibration is kept apart from the rewrite (``passes.ApplyPlan`` only reads a :class:`Calibration`):

1. :func:`layer_input_probe` turns ``main`` into a function returning the input of every layer;
2. :func:`observe` runs it (built for the host, scheduled) over sample batches and keeps, per layer, the
   exact min/max and a fixed-size random subsample of the values;
3. :func:`choose_range` picks ``[low, high]`` by ``minmax``, ``percentile`` or ``entropy`` (the KL
   threshold search of TensorRT-style calibration);
4. :class:`Calibration` holds the ranges with where they came from, and round-trips through JSON.

Samples are synthetic by default or the user's own; :mod:`ohq_tvm.samples` makes both (its names are
re-exported here).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tvm
from tqdm import tqdm
from tvm import relax

from .board.threads import host_vm
from .codegen.module import build_executable
from .errors import OHQError
from .frontend import ImportedModel, TensorSpec, module_inputs
from .jsonfile import read_json, write_json
from .passes.layer_id import check_not_lowered, layer_bindings, layer_id_of
from .plan import CALIBRATION_METHODS as METHODS
from .qparams import ActivationQParams
from .samples import (
    AUTO_SYNTHETIC,
    NORMALIZATIONS,
    SYNTHETIC_DATA,
    SYNTHETIC_KINDS,
    ImageNormalization,
    RandomData,
    load_image,
    load_samples,
    resolve_synthetic,
    synthetic_batches,
    synthetic_data,
    synthetic_label,
)
from .targets import resolve_target

CALIBRATION_FORMAT = "ohq-tvm/calibration"
# Values kept per layer for percentile/entropy; exact min/max are tracked over everything.
_SAMPLE_CAP = 1 << 20


@dataclass
class Calibration:
    """``ranges`` maps layer ids to the float range ``(low, high)`` of the layer's input activation."""

    method: str
    source: str
    num_samples: int
    ranges: dict[str, tuple[float, float]]
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise OHQError(f"unknown calibration method {self.method!r}; use one of {', '.join(METHODS)}")
        self.ranges = {str(k): (float(v[0]), float(v[1])) for k, v in self.ranges.items()}
        for layer_id, (low, high) in self.ranges.items():
            if not (np.isfinite(low) and np.isfinite(high) and low <= high):
                raise OHQError(f"calibration range of layer {layer_id!r} is not a finite interval")

    def qparams(self, layer_id: str) -> ActivationQParams:
        """The uint8 quantization of ``layer_id``'s input."""
        if layer_id not in self.ranges:
            raise OHQError(f"calibration has no range for layer {layer_id!r}; calibrate this model first")
        return ActivationQParams.from_range(*self.ranges[layer_id])

    def to_json(self) -> dict[str, Any]:
        return {
            "format": CALIBRATION_FORMAT,
            "method": self.method,
            "source": self.source,
            "num_samples": self.num_samples,
            "options": dict(self.options),
            "ranges": {k: list(v) for k, v in self.ranges.items()},
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Calibration:
        if data.get("format") != CALIBRATION_FORMAT:
            raise OHQError(f"not an ohq-tvm calibration (format {data.get('format')!r})")
        return cls(
            data["method"],
            data["source"],
            int(data["num_samples"]),
            dict(data["ranges"]),
            data.get("options", {}),
        )

    def save(self, path: str | os.PathLike) -> Path:
        return write_json(path, self.to_json(), "calibration")

    @classmethod
    def load(cls, path: str | os.PathLike) -> Calibration:
        data = read_json(path, "calibration")
        try:
            return cls.from_json(data)
        except (KeyError, TypeError, ValueError) as err:
            raise OHQError(f"calibration file {path} is malformed: {err!r}") from None


def layer_input_probe(mod: tvm.IRModule) -> tuple[tvm.IRModule, list[list[str]]]:
    """A module whose ``main`` returns the input of every layer instead of the model's outputs.

    Returns the module and, per output, the ids of the layers reading that input (layers sharing an input
    share an output). Needs layer ids (``AssignLayerIds``).
    """
    flat = relax.transform.ToNonDataflow()(mod)
    func = flat["main"]
    outputs: list[relax.Expr] = []
    readers: list[list[str]] = []
    position: dict[relax.Expr, int] = {}
    for binding in layer_bindings(func):
        layer_id = layer_id_of(binding.var)
        if layer_id is None:
            raise OHQError("calibration needs layer ids: run AssignLayerIds first")
        data = binding.value.args[0]
        if data not in position:
            position[data] = len(outputs)
            outputs.append(data)
            readers.append([])
        readers[position[data]].append(layer_id)
    if not outputs:
        check_not_lowered(mod, "calibrate")
        raise OHQError("the model has no conv/dense layers to calibrate")
    body = relax.BlockBuilder().normalize(relax.SeqExpr(func.body.blocks, relax.Tuple(outputs)))
    probe = relax.Function(func.params, body, None, func.is_pure, func.attrs)
    updated = tvm.IRModule({gv: f for gv, f in flat.functions_items() if gv.name_hint != "main"})
    updated["main"] = probe
    updated = relax.transform.DeadCodeElimination(["main"])(updated)
    return updated, readers


@dataclass
class Observation:
    """What was seen at one layer input: exact extremes and a random subsample of values."""

    minimum: float = np.inf
    maximum: float = -np.inf
    parts: list[np.ndarray] = field(default_factory=list)
    seen: int = 0

    def add(self, values: np.ndarray, keep: int, rng: np.random.Generator) -> None:
        flat = np.asarray(values, np.float32).reshape(-1)
        self.minimum = min(self.minimum, float(flat.min()))
        self.maximum = max(self.maximum, float(flat.max()))
        self.seen += flat.size
        self.parts.append(flat if flat.size <= keep else rng.choice(flat, keep, replace=False))

    @property
    def values(self) -> np.ndarray:
        return np.concatenate(self.parts)


def observe(
    mod: tvm.IRModule,
    inputs: Sequence[TensorSpec],
    batches: Sequence[Mapping[str, np.ndarray]],
    progress: bool = False,
    seed: int = 0,
) -> dict[str, Observation]:
    """Run the fp32 module on ``batches`` (built for the host; ``inputs`` are ``main``'s parameters in
    order) and record every layer's input."""
    probe, readers = layer_input_probe(mod)
    executable = build_executable(probe, resolve_target("host"))
    vm = host_vm(executable)
    rng = np.random.default_rng(seed)
    found = [Observation() for _ in readers]
    keep = max(1, _SAMPLE_CAP // max(1, len(batches)))
    iterator: Iterable = batches
    if progress:
        iterator = tqdm(batches, desc="calibrating", unit="batch")
    for batch in iterator:
        args = []
        for spec in inputs:
            if spec.name not in batch:
                raise OHQError(f"calibration sample lacks input {spec.name!r}")
            args.append(tvm.runtime.tensor(np.ascontiguousarray(batch[spec.name], dtype=spec.dtype)))
        result = vm["main"](*args)
        values = [result[i].numpy() for i in range(len(readers))]
        for observation, value in zip(found, values, strict=True):
            observation.add(value, keep, rng)
    return {layer_id: found[i] for i, ids in enumerate(readers) for layer_id in ids}


def _kl_search(magnitudes: np.ndarray, peak: float, levels: int, bins: int) -> tuple[int, np.ndarray]:
    """Index of the histogram edge whose clipping threshold minimises KL(reference || quantized)."""
    hist, edges = np.histogram(np.minimum(magnitudes, peak), bins=bins, range=(0.0, peak))
    hist = hist.astype(np.float64)
    best, best_kl = bins, np.inf
    for stop in range(levels, bins + 1, 16):
        reference = hist[:stop].copy()
        reference[-1] += hist[stop:].sum()  # what the threshold clips lands in the last level
        present = hist[:stop] > 0
        starts = (np.arange(levels) * stop) // levels
        sums = np.add.reduceat(hist[:stop], starts)
        counts = np.add.reduceat(present.astype(np.float64), starts)
        group = np.repeat(np.arange(levels), np.diff(np.append(starts, stop)))
        expanded = np.where(present, sums[group] / np.maximum(counts[group], 1), 0.0)
        if expanded.sum() == 0:
            continue
        p, q = reference / reference.sum(), expanded / expanded.sum()
        mask = p > 0
        kl = float(np.sum(p[mask] * np.log(p[mask] / np.maximum(q[mask], 1e-12))))
        if kl < best_kl:
            best, best_kl = stop, kl
    return best, edges


def _entropy_threshold(magnitudes: np.ndarray, peak: float, levels: int, bins: int = 2048) -> float:
    """The clipping threshold in ``(0, peak]`` minimising KL(reference || quantized) over a histogram.

    The search cannot go below ``levels / bins`` of the range it histograms; when it lands there (a few
    far outliers), it zooms in on that range and searches again.
    """
    if peak <= 0 or magnitudes.size == 0:
        return float(max(peak, 0.0))
    for _ in range(4):
        best, edges = _kl_search(magnitudes, peak, levels, bins)
        if best > levels:
            break
        peak = float(edges[best]) * 1.25
    return float(edges[best])


def choose_range(observation: Observation, method: str, percentile: float = 99.99) -> tuple[float, float]:
    """``[low, high]`` for one layer input.

    ``minmax`` takes the observed extremes; ``percentile`` clips to the ``percentile`` (and, for signed
    inputs, ``100 - percentile``) quantile; ``entropy`` clips |x| at the KL-optimal threshold (255 levels
    for non-negative inputs, 128 per side for signed ones).
    """
    low, high = observation.minimum, observation.maximum
    if method == "minmax":
        return low, high
    values = observation.values
    if method == "percentile":
        top = float(np.percentile(values, percentile))
        bottom = float(np.percentile(values, 100.0 - percentile)) if low < 0 else low
        return max(low, bottom), min(high, top)
    if method == "entropy":
        if low >= 0:
            # Exact zeros (half of a post-ReLU tensor) quantize exactly; left in, their spike drives the
            # KL search to clip far too low.
            return low, _entropy_threshold(values[values > 0], high, levels=255)
        threshold = _entropy_threshold(np.abs(values), max(-low, high), levels=128)
        return max(low, -threshold), min(high, threshold)
    raise OHQError(f"unknown calibration method {method!r}; use one of {', '.join(METHODS)}")


def calibrate(
    model: ImportedModel | tvm.IRModule,
    method: str = "minmax",
    samples: Sequence[Mapping[str, np.ndarray]] | None = None,
    num_samples: int = 8,
    synthetic: str = "gaussian",
    percentile: float = 99.99,
    seed: int = 0,
    progress: bool = False,
    inputs: Sequence[TensorSpec] | None = None,
) -> Calibration:
    """Ranges for every layer's input. ``samples`` are the user's batches; without them, ``num_samples``
    synthetic batches of kind ``synthetic`` are used (and the result says so in ``source``).

    ``model`` is what :func:`~ohq_tvm.frontend.load_onnx` returns, or a Relax module with layer ids
    (e.g. from ``tvm.relax.frontend.onnx.from_onnx`` followed by ``AssignLayerIds(onnx_model)``); for a
    module, ``inputs`` gives ``main``'s input specs (default: read from its parameters, which then need
    static shapes), and synthetic data is drawn at random (``gaussian``, ``uniform``; the other kinds are
    made from the ONNX model). Raises :class:`OHQError` for an unknown method or data kind, no samples, a
    module whose layers ``LegalizeOps`` has already lowered, or inputs that do not match ``main``.
    """
    if method not in METHODS:
        raise OHQError(f"unknown calibration method {method!r}; use one of {', '.join(METHODS)}")
    if isinstance(model, ImportedModel):
        mod, specs = model.mod, model.inputs
    else:
        mod, specs = model, module_inputs(model, inputs)
    if samples is None:
        if isinstance(model, ImportedModel):
            synthetic = resolve_synthetic(model, synthetic)
            samples = synthetic_data(model, num_samples, synthetic, seed)
        elif isinstance(SYNTHETIC_DATA.get(synthetic), RandomData):
            samples = synthetic_batches(specs, num_samples, synthetic, seed)
        else:
            raise OHQError(
                f"calibrating a Relax module draws random synthetic data, not {synthetic!r}: give "
                "samples=[...], or import with ohq_tvm.frontend.load_onnx"
            )
        source = synthetic_label(synthetic)
    else:
        source = "samples"
    if not samples:
        raise OHQError("calibration got no samples")
    observations = observe(mod, specs, samples, progress=progress, seed=seed)
    ranges = {layer_id: choose_range(obs, method, percentile) for layer_id, obs in observations.items()}
    options = {"percentile": percentile} if method == "percentile" else {}
    return Calibration(method, source, len(samples), ranges, options)


__all__ = [
    "AUTO_SYNTHETIC",
    "CALIBRATION_FORMAT",
    "METHODS",
    "NORMALIZATIONS",
    "SYNTHETIC_DATA",
    "SYNTHETIC_KINDS",
    "Calibration",
    "ImageNormalization",
    "Observation",
    "calibrate",
    "choose_range",
    "layer_input_probe",
    "load_image",
    "load_samples",
    "observe",
    "resolve_synthetic",
    "synthetic_batches",
    "synthetic_data",
    "synthetic_label",
]
