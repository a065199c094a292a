"""Headline: the OHQ plan against what a user would deploy instead, on the host board, in one run.

Usage: python benchmarks/headline.py [--models mobilenet_v2,efficientnet_lite0,resnet18] [--trials 0]
       [--budget latency=1.1*int8] [--more-budgets latency=1.0*int8] [--repeats 15] [--out benchmarks/results]
       [--quiet-wait 30]
(needs `make peers`: torch, the pretrained weights, LiteRT with its converter and quantizer; scikit-image
for the photos)

Per model (MobileNetV2 and EfficientNet-Lite0 with real ImageNet weights; ResNet-18's architecture with
seeded random weights), everything built in this run:

- the peers of ``peer_engines``, as ``peers.py`` builds them: ``litert fp32`` / ``litert int8`` (LiteRT
  with XNNPACK, converted from the torch model), ``ort fp32``, ``ort int8 u8s8 qdq`` / ``ort int8 u8s8
  qoperator`` and ``ort int8 s8s8 qdq`` (ORT's default ``quantize_static``), calibrated on the held-out
  photos;
- ohq-tvm fp32 and uniform int8 (``--trials`` MetaSchedule trials per build; 0 = the default schedule);
- the OHQ plan: ``compile_model(budget=...)`` — every candidate operator timed on the loopback host board
  into a fresh database, MQE on synthetic data, the ILP — calibrated on the same held-out photos;
- the BOPs-proxy plan: fewest bit-operations at the OHQ plan's estimated loss (what hardware-blind
  methods choose), built the same way;
- the OHQ plan at each of ``--more-budgets`` (other points of the same frontier: the databases are warm,
  so each is a re-solve and a build), timed and evaluated like the rest.

Latency: every engine timed in the same interleaved rounds on this machine (TVM, ONNX Runtime and LiteRT
on the same threads: TVM's, every physical core). Accuracy: top-1 agreement with ohq-tvm's fp32 over 120
views of 24 photos, top-1 on foolbox's 20 labelled photos (not meaningful for the random-weight
ResNet-18). Size: weight bytes (as the plan stores them) and the file on disk. Pipeline time: the OHQ
``compile_model`` call from a cold start (fresh measurement database, tuning database and sensitivity
cache) and again warm (same budget, same databases, new output folder).

Writes results/headline.json (machine, settings, raw numbers) and results/headline.md: per model, the
fastest engine, and ohq-tvm's int8, fp32 and OHQ plan against the fastest peer int8 and fp32 (issue #25's
targets).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pretrained
import torch
import tvm
from accuracy import MODELS as PRETRAINED
from accuracy_report import metrics
from peer_engines import (
    PEER_INT8,
    build_peers,
    fastest,
    peer_settings,
    real_model,
    target_lines,
    tvm_engine,
)
from photos import Preprocessing

from ohq_tvm.board import sigterm_as_exit, use_host_threads
from ohq_tvm.oqa.quiet import QuietGate
from ohq_tvm.pipeline import CompileResult, compile_model
from ohq_tvm.targets import resolve_target

from timing import BenchmarkRun, Rounds, conditions, interleaved, parse_args

MODELS = {**PRETRAINED, "resnet18": (pretrained.load_resnet18, Preprocessing(256, "imagenet"))}
OURS = ("ohq-tvm fp32", "ohq-tvm int8", "bops-proxy plan", "ohq plan")


def budget_engine(budget: str) -> str:
    return f"ohq plan at {budget}"


def _weights_bytes(result: CompileResult) -> float | None:
    return result.plan.predicted.get("size_bytes") if result.plan is not None else None


def bench(
    name: str,
    scratch: Path,
    trials: int,
    budget: str,
    more_budgets: list[str],
    rounds: Rounds,
    say,
) -> dict:
    started = time.perf_counter()
    model = real_model(MODELS[name], scratch / name)
    with_bn, photos = model.with_bn, model.photos
    views, labelled = photos.views, photos.labelled
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
    x = views[0]  # views are [count, 1, 3, 224, 224]
    engines = build_peers(model, scratch / name, rounds.threads)
    say(f"[{name}] built everything in {time.perf_counter() - started:.0f} s; timing")

    built = {"ohq-tvm fp32": fp32, "ohq-tvm int8": int8, "bops-proxy plan": bops, "ohq plan": ohq, **others}
    engines |= {engine: tvm_engine(result.library_path, x) for engine, result in built.items()}
    timers = {e: engine.timer for e, engine in engines.items()}
    medians, raw = interleaved(timers, rounds.repeats, rounds.gate)

    logits = {e: np.concatenate([engine.run(v) for v in views]) for e, engine in engines.items()}
    reference = logits["ohq-tvm fp32"]
    accuracy = {e: metrics(logits[e], reference, labelled) for e in engines}
    sizes = {e: {"file_bytes": engine.path.stat().st_size} for e, engine in engines.items()}
    for engine, result in built.items():
        sizes[engine]["weights_bytes"] = _weights_bytes(result)
    sizes["ohq-tvm fp32"]["weights_bytes"] = planning.baselines["fp32"].predicted["size_bytes"]
    sizes["ohq-tvm int8"]["weights_bytes"] = planning.baselines["int8"].predicted["size_bytes"]
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


def markdown(record: dict) -> list[str]:
    settings, machine = record["settings"], record["machine"]
    lines = [
        "# Headline: the OHQ plan against the runtimes a user could deploy instead, and the other plans",
        "",
        f"Machine: {machine['cpu_model'].get('model name', '?')} ({machine['cpu']}), {machine['cores']} "
        f"cores, every engine on {settings['threads']} threads; TVM {tvm.__version__}, ONNX Runtime "
        f"{ort.__version__}, LiteRT {settings['peers']['litert']}. Budget `{settings['budget']}` (more: "
        f"{', '.join(settings.get('more_budgets', [])) or 'none'}), {settings['trials']} MetaSchedule "
        f"trials per build (0 = ohq-tvm's default schedule). {conditions(record)} Top-1 agreement with "
        "ohq-tvm fp32 over the same views.",
        "",
        "| model | engine | latency ms | vs fastest peer int8 | top-1 agreement with fp32 | foolbox top-1 "
        "| weights MB | file MB |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in record["models"]:
        m = row["median_ms"]
        best = m[fastest(m, PEER_INT8)]
        for engine in sorted(m, key=m.__getitem__):
            acc = row["accuracy"][engine]
            size = row["sizes"][engine].get("weights_bytes")
            foolbox = (
                "n/a"
                if row["model"] == "resnet18"
                else f"{acc['foolbox_top1_correct']}/{acc['foolbox_labelled']}"
            )
            lines.append(
                f"| {row['model']} | {engine} | {m[engine]:.2f} | {m[engine] / best:.2f}x | "
                f"{acc['top1_agreeing_views']}/{row['views']} | {foolbox} | "
                f"{'-' if size is None else f'{size / 1e6:.2f}'} | "
                f"{row['sizes'][engine]['file_bytes'] / 1e6:.2f} |"
            )
    lines += ["", "Fastest engines, and ohq-tvm against them (targets of issue #25):", ""]
    lines += target_lines(record["models"])
    lines += ["", "The OHQ plan's other targets:", ""]
    for row in record["models"]:
        m = row["median_ms"]
        agree = row["accuracy"]["ohq plan"]["top1_agreement"]
        pipe = row["pipeline"]
        lines.append(
            f"- {row['model']}: OHQ plan at top-1 agreement {agree:.3f} (target ≥ 0.98); BOPs-proxy / OHQ = "
            f"{m['bops-proxy plan'] / m['ohq plan']:.2f}x (target ≥ 1.15); pipeline "
            f"{pipe['cold_s']:.0f} s cold (target ≤ 1800), {pipe['warm_s']:.0f} s warm (target ≤ 60); "
            f"plan {row['plans']['ohq']['counts']}"
        )
        best = fastest(m, PEER_INT8)
        for engine in [e for e in m if e.startswith("ohq plan at ")]:
            lines.append(
                f"  - {engine}: / {best} = {m[engine] / m[best]:.2f} at top-1 agreement "
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
            "--quiet-wait": "30",
        },
    )
    torch.set_num_threads(1)
    # How long a timing waits for the canary at its usual speed (as peers.py: 3 s on a host whose canary
    # never settles).
    gate = QuietGate(max_wait_s=float(args.quiet_wait))
    rounds = Rounds(args.repeats, use_host_threads(), gate)  # the peers on TVM's threads
    run = BenchmarkRun("headline", resolve_target("host").tvm_target(), gate)
    more_budgets = [b for b in args.more_budgets.split(",") if b]
    rows = []
    with tempfile.TemporaryDirectory(prefix="ohq-headline-") as scratch:
        for name in [n for n in args.models.split(",") if n]:
            rows.append(
                bench(name, Path(scratch), int(args.trials), args.budget, more_budgets, rounds, run.say)
            )
    settings = {
        "budget": args.budget,
        "more_budgets": more_budgets,
        "trials": int(args.trials),
        "repeats": args.repeats,
        "threads": rounds.threads,
        "peers": peer_settings(),
        "ohq_tvm_calibration": "the same held-out photos, minmax",
    }
    run.write(args.out, settings, markdown, models=rows)


if __name__ == "__main__":
    with sigterm_as_exit():  # a killed run still takes its loopback board down
        main()
