"""MQE: mask-guided quantization estimation. Each layer's sensitivity to each precision, with no dataset.

The model is compiled **once** with :class:`~ohq_tvm.passes.mask.InsertPrecisionMasks`; for every
synthetic (or user) batch it runs once with an all-zero mask (the float32 model) and once per
(layer, precision) with that one mask entry set. The sensitivity ``s[l][p]`` is the mean, over batches, of
the KL divergence between the softmax of the float32 output and of the output with layer ``l`` alone in
precision ``p``. The module runs on the board over RPC when a board is given, else on this machine.
"""

from __future__ import annotations

import gc
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Protocol

import numpy as np
import tvm
from tvm import relax

from .board import Board, host_vm
from .calibration import Calibration, calibrate
from .codegen.module import build_executable
from .codegen.toolchain import find_toolchain
from .errors import OHQError
from .frontend import ImportedModel
from .jsonfile import read_json, write_json
from .passes.mask import InsertPrecisionMasks, mask_layout
from .precision import Precision
from .progress import StageProgress
from .samples import (
    AUTO_SYNTHETIC,
    SYNTHETIC_DATA,
    ModelMadeData,
    resolve_synthetic,
    synthetic_data,
    synthetic_label,
)
from .targets import BoardSpec, resolve_target

SENSITIVITY_FORMAT = "ohq-tvm/sensitivity"


def kl_divergence(reference: np.ndarray, other: np.ndarray) -> float:
    """KL(softmax(reference) || softmax(other)) over the last axis, averaged over the other axes."""
    ref = reference.reshape(-1, reference.shape[-1]).astype(np.float64)
    oth = other.reshape(-1, other.shape[-1]).astype(np.float64)
    log_p = ref - ref.max(axis=1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(axis=1, keepdims=True))
    log_q = oth - oth.max(axis=1, keepdims=True)
    log_q -= np.log(np.exp(log_q).sum(axis=1, keepdims=True))
    return float(np.mean(np.sum(np.exp(log_p) * (log_p - log_q), axis=1)))


@dataclass
class Sensitivity:
    """``values[layer][precision]``: mean KL divergence with that layer alone in that precision."""

    values: dict[str, dict[Precision, float]]
    data: str
    batches: int
    forward_passes: int
    seconds: float
    board: str = "local"
    calibration: str | None = None
    per_batch: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    model_sha256: str = ""

    def matches(self, model_sha256: str, precisions: Sequence[Precision], data: str, batches: int) -> bool:
        """Whether this estimate answers the same question (a cached one can then stand in for it)."""
        have = {p for row in self.values.values() for p in row}
        return (
            self.model_sha256 == model_sha256
            and set(precisions) <= have
            and self.data == data
            and self.batches == batches
        )

    def ranking(self, precision: Precision) -> list[str]:
        """Layer ids from most to least sensitive to ``precision``."""
        have = [lid for lid, row in self.values.items() if precision in row]
        return sorted(have, key=lambda lid: -self.values[lid][precision])

    def to_json(self) -> dict:
        return {
            "format": SENSITIVITY_FORMAT,
            "values": {lid: {p.value: v for p, v in row.items()} for lid, row in self.values.items()},
            "data": self.data,
            "batches": self.batches,
            "forward_passes": self.forward_passes,
            "seconds": self.seconds,
            "board": self.board,
            "calibration": self.calibration,
            "per_batch": self.per_batch,
            "model_sha256": self.model_sha256,
        }

    @classmethod
    def from_json(cls, data: Mapping) -> Sensitivity:
        if data.get("format") != SENSITIVITY_FORMAT:
            raise OHQError(f"not an ohq-tvm sensitivity file (format {data.get('format')!r})")
        values = {
            lid: {Precision(p): float(v) for p, v in row.items()} for lid, row in data["values"].items()
        }
        keys = ("board", "calibration", "per_batch", "model_sha256")
        return cls(
            values,
            data["data"],
            int(data["batches"]),
            int(data["forward_passes"]),
            float(data["seconds"]),
            **{k: data[k] for k in keys if k in data},
        )

    def save(self, path: str | os.PathLike) -> Path:
        return write_json(path, self.to_json(), "sensitivity estimate")

    @classmethod
    def load(cls, path: str | os.PathLike) -> Sensitivity:
        return cls.from_json(read_json(path, "sensitivity"))


def _runner(executable: relax.Executable, spec: BoardSpec, board: Board | None, scratch: str):
    """A function running ``main`` on (inputs..., mask) and returning the first output as numpy."""
    if board is None:
        vm = host_vm(executable)
        return lambda *args: _first(vm["main"](*[tvm.runtime.tensor(np.ascontiguousarray(a)) for a in args]))
    library = Path(scratch) / "mqe.so"
    executable.export_library(str(library), fcompile=find_toolchain(spec.cross_triple).fcompile())
    remote = board.connect().load_vm(library)
    return lambda *args: remote.run(list(args))[0]


def _first(result) -> np.ndarray:
    return result.numpy() if hasattr(result, "numpy") else result[0].numpy()


def _score(run, imported, samples, layers, columns, per_batch, total, progress) -> int:
    """Run every batch with the zero mask and each one-hot mask; append KL scores; return passes."""
    done = 0
    for batch in samples:
        inputs = [np.asarray(batch[s.name], dtype=s.dtype) for s in imported.inputs]
        mask = np.zeros((len(layers), len(columns)), np.float32)
        reference = run(*inputs, mask)
        done += 1
        for row, layer_id in enumerate(layers):
            for column, precision in enumerate(columns):
                mask[row, column] = 1.0
                output = run(*inputs, mask)
                mask[row, column] = 0.0
                per_batch[layer_id][precision.value].append(kl_divergence(reference, output))
                done += 1
                if progress is not None:
                    progress(done, total)
    return done


def estimate_sensitivity(
    imported: ImportedModel,
    precisions: Sequence[Precision | str] = (Precision.INT8,),
    calibration: Calibration | None = None,
    *,
    samples: Sequence[Mapping[str, np.ndarray]] | None = None,
    num_batches: int = 4,
    synthetic: str = "gaussian",
    seed: int = 0,
    target: str | BoardSpec = "host",
    board: Board | None = None,
    progress: Callable[[int, int], None] | None = None,
    data_progress: Callable[[int, int], None] | None = None,
) -> Sensitivity:
    """Per-layer, per-precision sensitivity of ``imported`` (see the module docstring).

    ``precisions`` are the lower precisions to score (fp32 is the reference). Integer precisions use
    ``calibration``, calibrated here (minmax, on the same kind of data) when not given. Batches are
    ``samples`` when given, else ``num_batches`` synthetic batches of kind ``synthetic`` (``auto``:
    distilled from the model's BatchNormalization statistics when it has them, else Gaussian; see
    :func:`~ohq_tvm.calibration.resolve_synthetic`). ``progress(done, total)`` is called after each
    forward pass, ``data_progress(step, steps)`` after each distillation step. Raises
    :class:`OHQError` for a model without layers.
    """
    chosen = [Precision.parse(str(p)) for p in precisions]
    spec = resolve_target(target)
    started = time.perf_counter()
    if samples is None:
        synthetic = resolve_synthetic(imported, synthetic)
        samples = synthetic_data(imported, num_batches, synthetic, seed + 1, progress=data_progress)
        data = synthetic_label(synthetic)
    else:
        data = "samples"
    if any(p.is_integer for p in chosen) and calibration is None:
        calibration = calibrate(imported, "minmax", samples=list(samples), seed=seed)
    masked = InsertPrecisionMasks(chosen, calibration)(imported.mod)
    layers, columns = mask_layout(masked)
    if not layers:
        raise OHQError("the model has no conv/dense layers to estimate")
    executable = build_executable(masked, spec)
    total = len(samples) * (1 + len(layers) * len(columns))
    per_batch: dict[str, dict[str, list[float]]] = {lid: {p.value: [] for p in columns} for lid in layers}
    with tempfile.TemporaryDirectory(prefix="ohq-tvm-mqe-") as scratch:
        run = _runner(executable, spec, board, scratch)
        try:
            done = _score(run, imported, samples, layers, columns, per_batch, total, progress)
        finally:
            # Free the board's session now (the server serves one at a time), not at some later GC.
            del run
            gc.collect()
    values = {
        lid: {Precision(p): float(np.mean(scores)) for p, scores in row.items()}
        for lid, row in per_batch.items()
    }
    return Sensitivity(
        values,
        data,
        len(samples),
        done,
        time.perf_counter() - started,
        board=board.label if board is not None else "local",
        calibration=calibration.method if calibration is not None else None,
        per_batch=per_batch,
        model_sha256=imported.sha256,
    )


class SensitivityEstimate(NamedTuple):
    """An estimator's answer: the sensitivity, and whether it was read from a cache, not computed now."""

    sensitivity: Sensitivity
    reused: bool = False


class SensitivityEstimator(Protocol):
    """How much each layer's output moves when that layer alone runs in a lower precision: what the
    planner minimises."""

    def estimate(
        self, imported: ImportedModel, precisions: Sequence[Precision], hooks: StageProgress
    ) -> SensitivityEstimate:
        """The sensitivity of every layer of ``imported`` in each of ``precisions`` (fp32 is the
        reference); progress and messages go to ``hooks``."""
        ...


@dataclass
class MQEEstimator:
    """MQE on the board (:func:`estimate_sensitivity`) on ``num_batches`` synthetic batches of kind
    ``synthetic`` (``auto`` resolved per model), read from ``cache`` (a JSON path) when it answers the
    same question (same model, precisions, data and batches) and written there otherwise."""

    spec: BoardSpec
    board: Board | None
    num_batches: int = 4
    synthetic: str = AUTO_SYNTHETIC
    cache: str | os.PathLike | None = None

    def estimate(
        self, imported: ImportedModel, precisions: Sequence[Precision], hooks: StageProgress
    ) -> SensitivityEstimate:
        kind = resolve_synthetic(imported, self.synthetic)
        if self.cache is not None and Path(self.cache).is_file():
            try:
                cached = Sensitivity.load(self.cache)
            except OHQError:
                cached = None
            label = synthetic_label(kind)
            if cached is not None and cached.matches(imported.sha256, precisions, label, self.num_batches):
                return SensitivityEstimate(cached, reused=True)
        maker = SYNTHETIC_DATA[kind]
        if isinstance(maker, ModelMadeData):
            hooks.say(maker.describe(self.num_batches))
        sensitivity = estimate_sensitivity(
            imported,
            precisions,
            num_batches=self.num_batches,
            synthetic=kind,
            target=self.spec,
            board=self.board,
            progress=hooks.estimating,
            data_progress=hooks.distilling,
        )
        if self.cache is not None:
            sensitivity.save(self.cache)
        return SensitivityEstimate(sensitivity)


__all__ = [
    "SENSITIVITY_FORMAT",
    "MQEEstimator",
    "Sensitivity",
    "SensitivityEstimate",
    "SensitivityEstimator",
    "estimate_sensitivity",
    "kl_divergence",
]
