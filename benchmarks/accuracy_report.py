"""Metrics, the result record and the markdown tables of the accuracy benchmark (accuracy.py)."""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import subprocess
from pathlib import Path

import numpy as np

from timing import machine_record


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=1, keepdims=True)


def metrics(logits: np.ndarray, fp32: np.ndarray, labelled_centre: list[tuple[int, int]]) -> dict:
    """Top-1 agreement with ``fp32`` over all views, top-1 on the labelled centre views, KL and cosine.

    ``logits`` and ``fp32`` are ``[views, classes]``; ``labelled_centre`` lists ``(view, label)``.
    """
    top1, reference = logits.argmax(1), fp32.argmax(1)
    p, q = _softmax(fp32), _softmax(logits)
    kl = np.sum(p * (np.log(np.maximum(p, 1e-300)) - np.log(np.maximum(q, 1e-300))), axis=1)
    cosine = np.sum(logits * fp32, axis=1) / (np.linalg.norm(logits, axis=1) * np.linalg.norm(fp32, axis=1))
    correct = [int(top1[view] == label) for view, label in labelled_centre]
    return {
        "top1_agreement": float(np.mean(top1 == reference)),
        "top1_agreeing_views": int(np.sum(top1 == reference)),
        "foolbox_top1_correct": int(sum(correct)),
        "foolbox_labelled": len(correct),
        "kl_mean": float(kl.mean()),
        "cosine_mean": float(cosine.mean()),
        "top1_per_view": top1.tolist(),
        "kl_per_view": [round(float(k), 6) for k in kl],
    }


def ohq_tvm_source() -> dict:
    """The ohq_tvm that runs: where it is imported from, the HEAD of the repository this script is in, and
    which of HEAD's package files the imported copy differs from (an installed copy can be stale, and
    the work tree can change during a run). Call it before the run."""
    import ohq_tvm

    repo = Path(__file__).resolve().parent.parent
    package = Path(ohq_tvm.__file__).parent

    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True)
        return done.stdout.strip()

    differing = []
    for line in git("ls-tree", "-r", "HEAD", "--", "ohq_tvm", "passes", "targets").splitlines():
        blob, path = line.split()[2], line.split("\t", 1)[1]
        top, _, rest = path.partition("/")
        installed = package / rest if top == "ohq_tvm" else package / top / rest
        content = installed.read_bytes() if installed.is_file() else None
        if content is None or hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest() != blob:
            differing.append(path)
    return {
        "imported_from": str(package),
        "repository_head": git("rev-parse", "HEAD"),
        "files_differing_from_head": differing,
    }


def record_header(target, source: dict, settings: dict, results: list[dict], seconds: float) -> dict:
    record = machine_record(target)
    for package in ("torch", "onnx", "pillow", "scikit-image", "foolbox"):
        try:
            record["versions"][package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            record["versions"][package] = None
    record["versions"]["TVM_NUM_THREADS"] = os.environ.get("TVM_NUM_THREADS")
    record["ohq_tvm"] = source
    return {"benchmark": "accuracy", **record, "settings": settings, "results": results, "seconds": seconds}


def _describe(source: dict) -> str:
    differing = len(source["files_differing_from_head"])
    head = source["repository_head"][:10]
    return f"as at {head}" if not differing else f"differing from {head} in {differing} files"


def _cell(row: dict | None, key: str, views: int) -> str:
    if row is None:
        return "–"
    if key == "agreement":
        return f"{row['top1_agreeing_views']}/{views} ({row['top1_agreement']:.1%})"
    if key == "foolbox":
        return f"{row['foolbox_top1_correct']}/{row['foolbox_labelled']}"
    if key == "kl":
        return f"{row['kl_mean']:.4f}"
    return f"{row['cosine_mean']:.4f}"


def markdown(record: dict) -> list[str]:
    settings = record["settings"]
    machine = record["machine"]
    cpu = machine["cpu_model"].get("model name", machine["cpu"])
    versions = record["versions"]
    lines = [
        "# Uniform int8 on real pretrained models: agreement with fp32 and top-1 on real photos",
        "",
        f"Machine: {cpu}, {machine['cores']} cores; TVM {versions['tvm']}, ONNX Runtime "
        f"{versions['onnxruntime']}, torch {versions['torch']}; ohq-tvm {_describe(record['ohq_tvm'])}; "
        f"total {record['seconds'] / 60:.1f} min "
        f"(TVM_NUM_THREADS={versions['TVM_NUM_THREADS']}, ONNX Runtime 1 thread).",
        "",
        f"Evaluation: {settings['evaluation_views']} views = {len(settings['evaluation_photos'])} photos "
        f"(foolbox's 20 labelled ImageNet photos + scikit-image {', '.join(settings['skimage_evaluation'])}) "
        f"x {len(settings['views'])} views (centre crop, its mirror, zoomed centre, two shifted crops). "
        "*foolbox top-1*: the 20 labelled centre views. *KL*: mean KL(softmax fp32 || softmax int8); "
        "*cosine*: mean cosine of the logits; fp32 = TVM fp32.",
        "",
        "Calibration data: *held-out photos* = scikit-image "
        f"{', '.join(settings['skimage_calibration'])} x {len(settings['views'])} views "
        f"({settings['held_out_batches']} batches, none evaluated); *2-fold foolbox* = the foolbox photos of "
        f"one index parity ({settings['two_fold_batches'][0]} views) calibrate the module evaluating the "
        "other parity (and half the scikit-image photos); "
        f"*synthetic* = {settings['synthetic_batches']} random batches, no data. "
        "Every conv/dense layer in int8, first and last included. *same ranges in ORT*: ONNX Runtime "
        "running ohq-tvm's QDQ export of that plan (identical ranges, ORT's kernels). ONNX Runtime's own "
        "`quantize_static` (QDQ, per-channel weights): *conv+gemm+clip, uint8 act* quantizes what ohq-tvm "
        "does (ORT also quantizes the outputs, logits included); "
        "*all ops, ORT defaults* is ORT as shipped (its entropy: 128 bins, a single candidate threshold; "
        f"the conv+gemm+clip rows' entropy uses {settings['onnxruntime_static']['entropy_bins']} bins).",
    ]
    for result in record["results"]:
        views = result["views"]
        lines += [
            "",
            f"## {result['model']} ({result['layers']} layers, {result['seconds'] / 60:.1f} min)",
            "",
            "| engine | calibration data | method | top-1 = fp32 | foolbox top-1 | KL | cosine "
            "| same ranges in ORT: top-1 = fp32 |",
            "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for row in result["rows"]:
            same = row.get("ort_on_qdq_export")
            lines.append(
                f"| {row['engine']} | {row['calibration']} | {row['method'] or '–'} | "
                f"{_cell(row, 'agreement', views)} | {_cell(row, 'foolbox', views)} | "
                f"{_cell(row, 'kl', views)} | {_cell(row, 'cosine', views)} | "
                f"{_cell(same, 'agreement', views)} |"
            )
        for source, reason in result["skipped"].items():
            lines += ["", f"{source} skipped: {reason}"]
    return lines
