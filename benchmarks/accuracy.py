"""Real-model accuracy of uniform int8: MobileNetV2 and EfficientNet-Lite0 with real ImageNet weights.

Usage: TVM_NUM_THREADS=1 python benchmarks/accuracy.py [--out benchmarks/results] [--models a,b]
(needs `make models`, and `pip install --no-deps scikit-image` for its bundled photos)

Inputs (photos.py): 24 evaluation photos (foolbox's 20 labelled ImageNet JPEGs, 4 scikit-image colour
photos) x 5 views (the model's centre crop, its mirror, a zoomed centre crop, two shifted crops) = 120
views. Every layer (first and last included, as ``ohq-tvm compile --precision int8``) in int8, calibrated
by minmax, percentile and entropy on:

- held-out photos: 5 other scikit-image colour photos x 5 views (25 batches), never evaluated;
- 2-fold foolbox: the foolbox photos of one index parity (10 photos x 5 views) calibrate the module that
  evaluates the photos of the other parity, so every view is judged by a module that never saw its photo;
- synthetic data (no data at all): ``gaussian`` (the package's default), ``uniform``, ``matched``
  where the model's first conv feeds a BatchNormalization, and ``distilled`` (inputs optimised until every
  BatchNormalization sees its training statistics) and ``inverted`` (inputs the classifier assigns to
  each class in turn); those two made once per model, shared by the three methods.

Compared with fp32 TVM (the reference; torch and ONNX Runtime fp32 as sanity checks), ONNX Runtime running
ohq-tvm's QDQ export of each plan (same ranges, ORT's kernels), and ONNX Runtime's own static int8
(ort_static.py) on the same real calibration sets. Metrics: top-1 agreement with fp32 over the 120 views,
top-1 on foolbox's labels (20 centre views), mean KL(softmax fp32 || softmax int8), mean logit cosine.

Writes results/accuracy.json (machine, versions, inputs, splits, raw per-view numbers) and
results/accuracy.md (one table per model).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import onnx
import pretrained
import torch
import tvm
from accuracy_report import markdown, metrics, ohq_tvm_source, record_header
from ort_static import ORT_CONFIGS, ORT_SETTINGS, ort_session, ort_static_int8
from photos import (
    SKIMAGE_CALIBRATION,
    SKIMAGE_EVALUATION,
    VIEWS,
    Preprocessing,
    foolbox_photos,
    skimage_photos,
    views_of,
)
from tvm import relax

from ohq_tvm import OHQError, Precision
from ohq_tvm.board import host_vm, sigterm_as_exit
from ohq_tvm.calibration import SYNTHETIC_KINDS, calibrate, synthetic_data
from ohq_tvm.codegen import build_executable
from ohq_tvm.distill import distillable
from ohq_tvm.frontend import load_onnx
from ohq_tvm.input_stats import matched_input_statistics
from ohq_tvm.invert import invertible
from ohq_tvm.layers import quantizable_layers
from ohq_tvm.passes import AnnotateCandidates, ApplyPlan
from ohq_tvm.plan import CALIBRATION_METHODS, Plan
from ohq_tvm.qdq import export_qdq
from ohq_tvm.targets import resolve_target

from timing import parse_args, write_results

MODELS = {
    "mobilenet_v2": (pretrained.load_mobilenet_v2, Preprocessing(256, "imagenet")),
    "efficientnet_lite0": (pretrained.load_efficientnet_lite0, Preprocessing(224, "half")),
}
SYNTHETIC_BATCHES = 8  # calibrate()'s default
FOLDS = 2
HELD_OUT, TWO_FOLD = "held-out photos", "2-fold foolbox"

Runner = Callable[[np.ndarray], np.ndarray]  # one [1, 3, 224, 224] input -> [1, classes] logits
# One module per fold: its calibration batches (None: synthetic) -> runners whose logits are recorded.
Engine = Callable[[list[np.ndarray] | None], list[Runner]]


class Evaluation:
    """The evaluation views, and per calibration source the folds: (batches, views that fold evaluates)."""

    def __init__(self, preprocessing: Preprocessing) -> None:
        self.photos = foolbox_photos() + skimage_photos(SKIMAGE_EVALUATION)
        self.views = views_of(self.photos, preprocessing)
        photo_of_view = np.repeat(np.arange(len(self.photos)), len(VIEWS))
        self.labelled_centre = [
            (i * len(VIEWS), p.label) for i, p in enumerate(self.photos) if p.label is not None
        ]
        everything = np.ones(len(self.views), bool)
        held_out = views_of(skimage_photos(SKIMAGE_CALIBRATION), preprocessing)
        foolbox = np.array([self.photos[i].label is not None for i in photo_of_view])
        self.folds: dict[str, list[tuple[list[np.ndarray] | None, np.ndarray]]] = {
            HELD_OUT: [(list(held_out), everything)],
            TWO_FOLD: [
                (list(self.views[foolbox & (photo_of_view % FOLDS == k)]), photo_of_view % FOLDS != k)
                for k in range(FOLDS)
            ],
        }
        for kind in SYNTHETIC_KINDS:
            self.folds[f"synthetic:{kind}"] = [(None, everything)]

    def run(self, source: str, engine: Engine) -> list[np.ndarray]:
        """``[views, classes]`` logits per runner, each view from the fold that evaluates it."""
        outputs: list[np.ndarray] = []
        for batches, mask in self.folds[source]:
            for i, runner in enumerate(engine(batches)):
                logits = np.concatenate([runner(x) for x in self.views[mask]])
                if len(outputs) <= i:
                    outputs.append(np.zeros((len(self.views), logits.shape[1]), np.float32))
                outputs[i][mask] = logits
        return outputs

    def settings(self) -> dict:
        return {
            "evaluation_photos": [{"name": p.name, "label": p.label} for p in self.photos],
            "evaluation_views": len(self.views),
            "views": [asdict(v) for v in VIEWS],
            "skimage_evaluation": list(SKIMAGE_EVALUATION),
            "skimage_calibration": list(SKIMAGE_CALIBRATION),
            "held_out_batches": len(self.folds[HELD_OUT][0][0]),
            "two_fold_batches": [len(batches) for batches, _ in self.folds[TWO_FOLD]],
            "synthetic_batches": SYNTHETIC_BATCHES,
            "calibration_methods": list(CALIBRATION_METHODS),
            "plan": "uniform int8, every conv/dense layer (first and last included)",
            "onnxruntime_static": ORT_SETTINGS,
        }


def _tvm_runner(executable: relax.Executable) -> Runner:
    vm = host_vm(executable)
    return lambda x: vm["main"](tvm.runtime.tensor(x)).numpy()


def _ort_runner(model: onnx.ModelProto | Path) -> Runner:
    session = ort_session(model)
    return lambda x: session.run(None, {"input": x})[0]


def _export(name: str, scratch: Path) -> tuple[torch.nn.Module, Path, Path]:
    """The torch model; its ONNX export with BatchNormalization kept (for TVM: ``matched`` reads it, the
    importer folds it) and the usual BN-fused export (for ONNX Runtime's quantizer)."""
    model = MODELS[name][0]()
    shape = (1, 3, 224, 224)
    kept = pretrained.export_onnx(model, shape, str(scratch / f"{name}.bn.onnx"), keep_batchnorm=True)
    fused = pretrained.export_onnx(model, shape, str(scratch / f"{name}.onnx"))
    return model, Path(kept), Path(fused)


def bench(name: str, scratch: Path, board, evaluation: Evaluation) -> dict:
    started = time.perf_counter()
    model, with_bn, fused = _export(name, scratch)
    views = evaluation.views
    imported = load_onnx(with_bn)
    layers = quantizable_layers(imported.mod)
    annotated = AnnotateCandidates(board, pin_first_last=False)(imported.mod)
    run_fp32 = _tvm_runner(build_executable(imported.mod, board))
    fp32 = np.concatenate([run_fp32(x) for x in views])
    rows: list[dict] = []

    def add(engine: str, source: str, method: str | None, logits: np.ndarray, **extra) -> None:
        row = {"engine": engine, "calibration": source, "method": method}
        row.update(metrics(logits, fp32, evaluation.labelled_centre), **extra)
        rows.append(row)
        print(
            f"[{name}] {engine:34s} {source:18s} {method or '-':10s} "
            f"agree {row['top1_agreeing_views']}/{len(views)} foolbox {row['foolbox_top1_correct']}/"
            f"{row['foolbox_labelled']} KL {row['kl_mean']:.4f} [{time.perf_counter() - started:.0f}s]",
            flush=True,
        )

    add("tvm fp32", "–", None, fp32)
    with torch.no_grad():
        torch_fp32 = np.concatenate([model(torch.from_numpy(x)).numpy() for x in views])
    add("torch fp32", "–", None, torch_fp32, max_abs_logit_diff=float(np.abs(torch_fp32 - fp32).max()))
    run_ort = _ort_runner(fused)
    ort_fp32 = np.concatenate([run_ort(x) for x in views])
    add("onnxruntime fp32", "–", None, ort_fp32, max_abs_logit_diff=float(np.abs(ort_fp32 - fp32).max()))

    skipped = {}
    optimised: dict[str, list[dict[str, np.ndarray]]] = {}  # distilled / inverted data, made once
    for source in evaluation.folds:
        kind = source.removeprefix("synthetic:") if source.startswith("synthetic:") else None
        if kind == "matched":
            try:
                matched_input_statistics(imported.onnx_model)
            except OHQError as err:
                skipped[source] = str(err)
                continue
        if kind == "distilled" and not distillable(imported):
            skipped[source] = "no BatchNormalization statistics to distil from"
            continue
        if kind == "inverted" and not invertible(imported):
            skipped[source] = "not a classifier Relax can differentiate"
            continue
        for method in CALIBRATION_METHODS:
            seconds = {"calibrate": 0.0, "build": 0.0}
            ranges = []

            def tvm_int8(batches, method=method, kind=kind, seconds=seconds, ranges=ranges) -> list[Runner]:
                t0 = time.perf_counter()
                if batches is None and kind in ("distilled", "inverted"):
                    if kind not in optimised:  # the same data for every method: made once
                        optimised[kind] = synthetic_data(imported, SYNTHETIC_BATCHES, kind)
                    calibration = calibrate(imported, method, samples=optimised[kind])
                elif batches is None:
                    calibration = calibrate(imported, method, num_samples=SYNTHETIC_BATCHES, synthetic=kind)
                else:
                    calibration = calibrate(imported, method, samples=[{"input": b} for b in batches])
                t1 = time.perf_counter()
                plan = Plan.uniform(layers, Precision.INT8, target=board.name, calibration=method)
                executable = build_executable(ApplyPlan(plan, calibration)(annotated), board)
                seconds["calibrate"] += t1 - t0
                seconds["build"] += time.perf_counter() - t1
                ranges.append(calibration.ranges)
                return [_tvm_runner(executable), _ort_runner(export_qdq(imported, plan, calibration))]

            logits, same_ranges = evaluation.run(source, tvm_int8)
            same = metrics(same_ranges, fp32, evaluation.labelled_centre)
            add("tvm int8", source, method, logits, seconds=seconds, ranges=ranges, ort_on_qdq_export=same)

    for source in (HELD_OUT, TWO_FOLD):
        for scope, method in ORT_CONFIGS:

            def ort_int8(batches, method=method, scope=scope) -> list[Runner]:
                return [_ort_runner(ort_static_int8(fused, batches, method, scope, scratch))]

            (logits,) = evaluation.run(source, ort_int8)
            add(f"onnxruntime int8 ({scope})", source, method, logits)

    return {
        "model": name,
        "preprocessing": asdict(MODELS[name][1]),
        "layers": len(layers),
        "views": len(views),
        "fp32_top1_per_view": fp32.argmax(1).tolist(),
        "skipped": skipped,
        "rows": rows,
        "seconds": time.perf_counter() - started,
    }


def main() -> None:
    args = parse_args(__doc__, repeats=1, extra={"--models": ",".join(MODELS)})
    torch.set_num_threads(1)
    board = resolve_target("host")
    source = ohq_tvm_source()
    started = time.perf_counter()
    results, settings = [], {}
    with tempfile.TemporaryDirectory() as scratch:
        for name in filter(None, args.models.split(",")):
            evaluation = Evaluation(MODELS[name][1])
            settings = evaluation.settings()
            results.append(bench(name, Path(scratch), board, evaluation))
    record = record_header(board.tvm_target(), source, settings, results, time.perf_counter() - started)
    write_results(args.out, "accuracy", record, markdown(record))


if __name__ == "__main__":
    with sigterm_as_exit():  # a killed run still takes its loopback board down
        main()
