"""How close a compiled (quantized) module's outputs are to the float32 model's, on the board.

Verification (:mod:`ohq_tvm.codegen.verify`) checks the arithmetic: the module computes what its plan says.
Fidelity measures what the plan costs: the module's first output against ONNX Runtime running the
original float32 model, on synthetic batches and, when the user has them, real samples.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ..board.session import RemoteVM
from ..frontend import ImportedModel
from ..samples import load_samples, synthetic_batches
from .verify import reference_session


@dataclass(frozen=True)
class Fidelity:
    """Agreement of the module's first output with float32's over ``samples`` inputs from ``source``.

    ``top1_agreement``: fraction of rows (samples × leading positions) whose arg-max class is the same;
    ``cosine``: mean cosine similarity of the output rows; ``kl``: mean KL(softmax(fp32) ‖ softmax(module));
    ``relative_l2``: ‖module − fp32‖ / ‖fp32‖ over everything.
    """

    source: str
    samples: int
    top1_agreement: float
    cosine: float
    kl: float
    relative_l2: float

    def to_json(self) -> dict[str, float | int]:
        return {
            "samples": self.samples,
            "top1_agreement": self.top1_agreement,
            "cosine": self.cosine,
            "kl": self.kl,
            "relative_l2": self.relative_l2,
        }


def compare_outputs(source: str, got: Sequence[np.ndarray], expected: Sequence[np.ndarray]) -> Fidelity:
    """Fidelity of outputs ``got`` (one array per sample) against ``expected`` (float32's)."""
    if not got or len(got) != len(expected):
        raise ValueError(f"need the same, non-zero number of outputs (got {len(got)}, {len(expected)})")
    rows_got = np.concatenate([g.reshape(-1, g.shape[-1]) for g in got]).astype(np.float64)
    rows_ref = np.concatenate([e.reshape(-1, e.shape[-1]) for e in expected]).astype(np.float64)
    agree = float(np.mean(rows_got.argmax(axis=1) == rows_ref.argmax(axis=1)))
    norms = np.linalg.norm(rows_got, axis=1) * np.linalg.norm(rows_ref, axis=1)
    cosine = float(np.mean(np.sum(rows_got * rows_ref, axis=1) / np.maximum(norms, 1e-30)))
    log_p = rows_ref - rows_ref.max(axis=1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(axis=1, keepdims=True))
    log_q = rows_got - rows_got.max(axis=1, keepdims=True)
    log_q -= np.log(np.exp(log_q).sum(axis=1, keepdims=True))
    kl = float(np.mean(np.sum(np.exp(log_p) * (log_p - log_q), axis=1)))
    relative = float(np.linalg.norm(rows_got - rows_ref) / max(np.linalg.norm(rows_ref), 1e-30))
    return Fidelity(source, len(got), agree, cosine, max(kl, 0.0), relative)


def measure_fidelity(
    vm: RemoteVM, imported: ImportedModel, batches: Sequence[Mapping[str, np.ndarray]], source: str
) -> Fidelity:
    """Run every batch on the board and in ONNX Runtime (float32 model); compare the first outputs.

    Raises :class:`~ohq_tvm.errors.BoardError` when the board fails mid-way.
    """
    float32 = reference_session(imported)
    got, expected = [], []
    for batch in batches:
        inputs = {spec.name: np.asarray(batch[spec.name], dtype=spec.dtype) for spec in imported.inputs}
        got.append(vm.run([inputs[spec.name] for spec in imported.inputs])[0])
        expected.append(float32(inputs)[0])
    return compare_outputs(source, got, expected)


def check_fidelity(
    vm: RemoteVM,
    imported: ImportedModel,
    *,
    samples: int = 8,
    eval_images: str | os.PathLike | None = None,
    normalization: str = "imagenet",
    seed: int = 0,
) -> dict[str, Fidelity]:
    """The module loaded on the board against float32 on ``samples`` synthetic batches (seeded apart
    from calibration's) and, when given, the images or ``.npy`` arrays in ``eval_images``; keyed by
    source. Raises :class:`~ohq_tvm.errors.OHQError` for unreadable images, ``BoardError`` for a board
    that fails."""
    found = {}
    if samples > 0:
        batches = synthetic_batches(imported.inputs, samples, "gaussian", seed + 7919)
        found["synthetic"] = measure_fidelity(vm, imported, batches, "synthetic")
    if eval_images is not None:
        images = load_samples(eval_images, imported.inputs, normalization)
        found["images"] = measure_fidelity(vm, imported, images, "images")
    return found


def describe(fidelity: Fidelity) -> str:
    return (
        f"{fidelity.source} top-1 agreement {fidelity.top1_agreement:.3f} over {fidelity.samples} "
        f"(cosine {fidelity.cosine:.4f}, KL {fidelity.kl:.2e})"
    )


def agreement_failure(fidelity: Mapping[str, Fidelity], min_agreement: float | None) -> str | None:
    """Why the module fails ``min_agreement`` (judged on the images when there are some), or None."""
    if min_agreement is None or not fidelity:
        return None
    judged = fidelity.get("images") or fidelity["synthetic"]
    if judged.top1_agreement >= min_agreement:
        return None
    return (
        f"top-1 agreement with fp32 on {judged.source} {judged.top1_agreement:.3f} is below the "
        f"required {min_agreement:g}"
    )


__all__ = [
    "Fidelity",
    "agreement_failure",
    "check_fidelity",
    "compare_outputs",
    "describe",
    "measure_fidelity",
]
