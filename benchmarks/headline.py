"""Headline: the OHQ plan against what a user would deploy instead, on the host board, in one run.

Usage: python benchmarks/headline.py [--models mobilenet_v2,efficientnet_lite0,resnet18] [--trials 0]
       [--budget latency=1.1*int8] [--more-budgets latency=1.0*int8] [--repeats 15] [--out benchmarks/results]
(needs `make models`: torch and the pretrained weights; scikit-image for the photos)

Per model (MobileNetV2 and EfficientNet-Lite0 with real ImageNet weights; ResNet-18's architecture with
seeded random weights), everything built in this run:

- ONNX Runtime fp32, and ONNX Runtime int8 (``quantize_static``: QDQ, per-channel int8 weights, as shipped
  otherwise, minmax) calibrated on the held-out photos;
- ohq-tvm fp32 and uniform int8 (``--trials`` MetaSchedule trials per build; 0 = the default schedule);
- the OHQ plan: ``compile_model(budget=...)`` — every candidate operator timed on the loopback host board
  into a fresh database, MQE on synthetic data, the ILP — calibrated on the same held-out photos;
- the BOPs-proxy plan: fewest bit-operations at the OHQ plan's estimated loss (what hardware-blind
  methods choose), built the same way;
- the OHQ plan at each of ``--more-budgets`` (other points of the same frontier: the databases are warm,
  so each is a re-solve and a build), timed and evaluated like the rest.

Latency: every engine timed in the same interleaved rounds on this machine (TVM's runtime and ONNX
Runtime both on all cores). Accuracy: top-1 agreement with ohq-tvm's fp32 over 120 views of 24 photos,
top-1 on foolbox's 20 labelled photos (not meaningful for the random-weight ResNet-18). Size: weight bytes
(as the plan stores them) and the file on disk. Pipeline time: the OHQ ``compile_model`` call from a cold
start (fresh measurement database, tuning database and sensitivity cache) and again warm (same budget,
same databases, new output folder).

Writes results/headline.json (machine, settings, raw numbers) and results/headline.md.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pretrained
import torch
import tvm
from accuracy import MODELS as PRETRAINED
from accuracy_report import metrics
from ort_static import ort_session, ort_static_int8
from photos import SKIMAGE_CALIBRATION, Preprocessing, photo_set

from ohq_tvm.board import host_vm, sigterm_as_exit
from ohq_tvm.pipeline import CompileResult, compile_model
from ohq_tvm.targets import resolve_target

from timing import interleaved, machine_record, ort_timer, parse_args, tvm_timer, write_results

MODELS = {**PRETRAINED, "resnet18": (pretrained.load_resnet18, Preprocessing(256, "imagenet"))}
ORT_SCOPE, ORT_METHOD = "all ops, ORT defaults", "minmax"
ENGINES = ("ort fp32", "ort int8", "tvm fp32", "tvm int8", "bops-proxy plan", "ohq plan")


def budget_engine(budget: str) -> str:
    return f"ohq plan at {budget}"


def _library_runner(path: Path):
    """The exported library as a local Relax VM: one [1, 3, 224, 224] input -> logits."""
    vm = host_vm(tvm.runtime.load_module(str(path)))
    return lambda x: vm["main"](tvm.runtime.tensor(x)).numpy()


def _weights_bytes(result: CompileResult) -> float | None:
    return result.plan.predicted.get("size_bytes") if result.plan is not None else None


def bench(
    name: str, scratch: Path, trials: int, budget: str, more_budgets: list[str], repeats: int, say
) -> dict:
    started = time.perf_counter()
    load, preprocessing = MODELS[name]
    model = load()
    shape = (1, 3, 224, 224)
    with_bn = Path(
        pretrained.export_onnx(model, shape, str(scratch / f"{name}.bn.onnx"), keep_batchnorm=True)
    )
    fused = Path(pretrained.export_onnx(model, shape, str(scratch / f"{name}.onnx")))
    photos = photo_set(preprocessing, scratch / f"{name}-calibration")
    views, labelled, calibration = photos.views, photos.labelled, photos.calibration

    db, tuning = scratch / f"{name}-oqa.sqlite", scratch / f"{name}-tuning"
    common = {
        "calibration_samples": photos.calibration_dir,
        "trials": trials,
        "tuning_dir": tuning,
        "progress": say,
    }
    t0 = time.perf_counter()
    ohq = compile_model(with_bn, "host", scratch / f"{name}-ohq", budget=budget, database=db, **common)
    cold_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    compile_model(with_bn, "host", scratch / f"{name}-ohq-warm", budget=budget, database=db, **common)
    warm_s = time.perf_counter() - t0
    planning = ohq.planning
    bops = compile_model(
        with_bn, "host", scratch / f"{name}-bops", plan=planning.baselines["bops-proxy"], **common
    )
    fp32 = compile_model(
        with_bn, "host", scratch / f"{name}-fp32", trials=trials, tuning_dir=tuning, progress=say
    )
    int8 = compile_model(with_bn, "host", scratch / f"{name}-int8", precision="int8", **common)
    others = {
        budget_engine(b): compile_model(
            with_bn, "host", scratch / f"{name}-ohq-{i}", budget=b, database=db, **common
        )
        for i, b in enumerate(more_budgets)
    }
    engines = (*ENGINES, *others)
    ort_int8 = ort_static_int8(fused, calibration, ORT_METHOD, ORT_SCOPE, scratch)
    ort_int8_path = scratch / f"{name}.ort-int8.onnx"
    say(f"[{name}] built everything in {time.perf_counter() - started:.0f} s; timing")

    built = {"tvm fp32": fp32, "tvm int8": int8, "bops-proxy plan": bops, "ohq plan": ohq, **others}
    runners, timers = {}, {}
    x = views[0]  # views are [count, 1, 3, 224, 224]
    for engine, result in built.items():
        runners[engine] = _library_runner(result.library_path)
        timers[engine] = tvm_timer(tvm.runtime.load_module(str(result.library_path)), [tvm.runtime.tensor(x)])
    threads = os.cpu_count() or 1
    for engine, source in (("ort fp32", fused), ("ort int8", ort_int8)):
        proto = source if isinstance(source, onnx.ModelProto) else onnx.load(str(source))
        timers[engine] = ort_timer(proto, {"input": x}, threads)
        session = ort_session(source)
        runners[engine] = lambda v, session=session: session.run(None, {"input": v})[0]
    medians, raw = interleaved({e: timers[e] for e in engines}, repeats)

    logits = {engine: np.concatenate([runners[engine](v) for v in views]) for engine in engines}
    reference = logits["tvm fp32"]
    accuracy = {engine: metrics(logits[engine], reference, labelled) for engine in engines}
    sizes = {
        "ort fp32": {"file_bytes": fused.stat().st_size},
        "ort int8": {"file_bytes": ort_int8_path.stat().st_size},
    }
    for engine, result in built.items():
        sizes[engine] = {
            "weights_bytes": _weights_bytes(result),
            "file_bytes": result.library_path.stat().st_size,
        }
    sizes["tvm fp32"]["weights_bytes"] = planning.baselines["fp32"].predicted["size_bytes"]
    sizes["tvm int8"]["weights_bytes"] = planning.baselines["int8"].predicted["size_bytes"]
    summary = planning.measurement.summary
    return {
        "model": name,
        "views": len(views),
        "weights": "random (seeded), architecture only" if name == "resnet18" else "pretrained ImageNet",
        "median_ms": medians,
        "raw_ms": raw,
        "accuracy": {
            e: {k: v for k, v in a.items() if k not in ("top1_per_view", "kl_per_view")}
            for e, a in accuracy.items()
        },
        "sizes": sizes,
        "plans": {
            "ohq": {"counts": ohq.plan.counts(), "predicted": ohq.plan.predicted, "notes": ohq.plan.notes},
            "bops-proxy": {"counts": bops.plan.counts(), "predicted": bops.plan.predicted},
            **{
                engine: {"counts": r.plan.counts(), "predicted": r.plan.predicted}
                for engine, r in others.items()
            },
            "uniform int8 (predicted)": planning.baselines["int8"].predicted,
            "fp32 (predicted)": planning.baselines["fp32"].predicted,
        },
        "pipeline": {
            "cold_s": round(cold_s, 1),
            "warm_s": round(warm_s, 1),
            "stage_seconds_cold": ohq.stage_seconds,
            "operators_measured": summary.measured,
            "mqe_forward_passes": planning.sensitivity.forward_passes,
            "mqe_seconds": round(planning.sensitivity.seconds, 1),
        },
        "verified": {engine: result.verified for engine, result in built.items()},
        "seconds": round(time.perf_counter() - started, 1),
    }


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _gate_text(record: dict) -> str:
    gate = record.get("interleaved_timing_gate") or {}
    if gate.get("canary_best_ms") is None:
        return "gate not used"
    return (
        f"fastest canary {gate['canary_best_ms']:.3f} ms, {gate['timings_that_waited']} timings waited, "
        f"{gate['waited_s']:.0f} s in all"
    )


def markdown(record: dict) -> list[str]:
    settings = record["settings"]
    lines = [
        "# Headline: OHQ plan vs ONNX Runtime and the other plans",
        "",
        f"Machine: {record['machine']['cpu']}, {record['machine']['cores']} cores; TVM {tvm.__version__} "
        f"({record['machine']['tvm_threads']} threads), ONNX Runtime {ort.__version__}. "
        f"Budget `{settings['budget']}` (more: {', '.join(settings.get('more_budgets', [])) or 'none'}), "
        f"{settings['trials']} MetaSchedule "
        f"trials per build (0 = ohq-tvm's default schedule), median of {settings['repeats']} interleaved "
        f"rounds; load average {settings['load_average_1_5_15_min']['start'][0]:.2f} at the start, "
        f"{settings['load_average_1_5_15_min']['end'][0]:.2f} at the end. Every timing started once the "
        "canary of `ohq_tvm.oqa.quiet` ran at the machine's usual speed (redone when it slowed "
        f"meanwhile): {_gate_text(record)}.",
        "",
        "| model | engine | latency ms | vs ORT int8 | top-1 agreement with fp32 | foolbox top-1 "
        "| weights MB | file MB |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in record["models"]:
        ort_int8 = row["median_ms"]["ort int8"]
        for engine in row["median_ms"]:
            ms = row["median_ms"][engine]
            acc = row["accuracy"][engine]
            size = row["sizes"][engine].get("weights_bytes")
            foolbox = (
                "n/a"
                if row["model"] == "resnet18"
                else f"{acc['foolbox_top1_correct']}/{acc['foolbox_labelled']}"
            )
            lines.append(
                f"| {row['model']} | {engine} | {ms:.2f} | {ms / ort_int8:.2f}x | "
                f"{acc['top1_agreeing_views']}/{row['views']} | {foolbox} | "
                f"{'-' if size is None else f'{size / 1e6:.2f}'} | "
                f"{row['sizes'][engine]['file_bytes'] / 1e6:.2f} |"
            )
    lines += ["", "Targets:", ""]
    for row in record["models"]:
        m = row["median_ms"]
        agree = row["accuracy"]["ohq plan"]["top1_agreement"]
        pipe = row["pipeline"]
        lines.append(
            f"- {row['model']}: OHQ plan / ORT int8 = {m['ohq plan'] / m['ort int8']:.2f} (target ≤ 0.8) at "
            f"top-1 agreement {agree:.3f} (target ≥ 0.98); BOPs-proxy / OHQ = "
            f"{m['bops-proxy plan'] / m['ohq plan']:.2f}x (target ≥ 1.15); pipeline "
            f"{pipe['cold_s']:.0f} s cold (target ≤ 1800), {pipe['warm_s']:.0f} s warm (target ≤ 60); "
            f"plan {row['plans']['ohq']['counts']}"
        )
        for engine in [e for e in m if e.startswith("ohq plan at ")]:
            lines.append(
                f"  - {engine}: / ORT int8 = {m[engine] / m['ort int8']:.2f} at top-1 agreement "
                f"{row['accuracy'][engine]['top1_agreement']:.3f}; plan {row['plans'][engine]['counts']}"
            )
    return lines


def main() -> None:
    args = parse_args(
        __doc__,
        repeats=15,
        extra={
            "--models": ",".join(MODELS),
            "--trials": "0",
            "--budget": "latency=1.1*int8",
            "--more-budgets": "latency=1.0*int8",
        },
    )
    torch.set_num_threads(1)
    target = resolve_target("host").tvm_target()
    started = time.perf_counter()
    load_before = os.getloadavg()

    def say(message: str) -> None:
        print(f"  [{time.perf_counter() - started:6.0f}s] {message}", flush=True)

    more_budgets = [b for b in args.more_budgets.split(",") if b]
    rows = []
    with tempfile.TemporaryDirectory(prefix="ohq-headline-") as scratch:
        for name in [n for n in args.models.split(",") if n]:
            rows.append(
                bench(name, Path(scratch), int(args.trials), args.budget, more_budgets, args.repeats, say)
            )
    record = {
        "benchmark": "headline",
        **machine_record(target),
        "settings": {
            "budget": args.budget,
            "more_budgets": more_budgets,
            "trials": int(args.trials),
            "repeats": args.repeats,
            "onnxruntime_int8": f"quantize_static QDQ per-channel, {ORT_SCOPE}, {ORT_METHOD}",
            "calibration": f"held-out photos {list(SKIMAGE_CALIBRATION)} (5 views each)",
            "wall_s": round(time.perf_counter() - started, 1),
            "load_average_1_5_15_min": {"start": load_before, "end": os.getloadavg()},
        },
        "models": rows,
    }
    write_results(args.out, "headline", record, markdown(record))


if __name__ == "__main__":
    with sigterm_as_exit():  # a killed run still takes its loopback board down
        main()
