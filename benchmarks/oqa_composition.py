"""Hardware truth for OQA: do the per-operator latencies measured on the board add up to the model's?

Usage: python benchmarks/oqa_composition.py [--repeats N] [--out benchmarks/results] [--models a,b]

On the loopback host board (one RPC server), for each model (generated, random weights: latency does not
depend on weight values):

1. every workload of the model (layers in fp32 and int8, quantize/dequantize, glue) is measured into a
   fresh database, exactly as ``ohq-tvm measure`` does (kernel by kernel, weights and output flushed from
   the caches before each run, input warm: see ``ohq_tvm.oqa.kernel_timing``);
2. the uniform fp32 and int8 plans are built whole and timed (``ohq_tvm.oqa.in_model``, as planning
   does), giving each precision's in-model factor;
3. for the uniform plans and for mixed plans the factors were not fitted on (halves, alternation, random
   80%-int8 mixes), the predicted latency, as the sum of the parts measured alone (see
   ``ohq_tvm.oqa.cost``) and with the in-model factors, is compared with the end-to-end latency of the
   whole model built with that plan and timed on the same board with the same timer, ``--repeats``
   times (median reported);
4. the XGBoost latency model's cross-validated error over all rows, and its error predicting one model's
   unseen workloads from the other model's measurements.

The ratio predicted / measured on the mixed plans is the number that matters: within 0.85..1.15 the
composition is trusted.
Writes results/oqa_composition.json (machine, versions, every part's latency, raw end-to-end repeats)
and results/oqa_composition.md.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from ohq_tvm import Precision, models
from ohq_tvm.board import LoopbackBoard, sigterm_as_exit
from ohq_tvm.build.module import build_executable
from ohq_tvm.calibration import calibrate
from ohq_tvm.frontend import load_onnx
from ohq_tvm.layers import quantizable_layers
from ohq_tvm.oqa import LatencyDatabase, Measurer, TimingConfig, extract_workloads
from ohq_tvm.oqa.cost import plan_latency
from ohq_tvm.oqa.in_model import measured_scales
from ohq_tvm.oqa.latency_model import MIN_TRAINING_ROWS, LatencyModel, mape
from ohq_tvm.oqa.measure import schedule_label
from ohq_tvm.oqa.whole_model import time_with_measurer
from ohq_tvm.passes import AnnotateCandidates, ApplyPlan
from ohq_tvm.plan import Plan
from ohq_tvm.targets import resolve_target

from timing import machine_record, parse_args, scratch_host_board, write_results

CASES = {"mobilenet_v2": models.mobilenet_v2, "efficientnet_lite0": models.efficientnet_lite0}
PLANS = (Precision.FP32, Precision.INT8)
TIMING = TimingConfig(repeat=5, min_repeat_ms=40)
ACCEPT = (0.85, 1.15)


def mixed_plans(layers: list[str]) -> dict[str, dict[str, Precision]]:
    """Plans the in-model scales were not fitted on: halves, alternation, and random 80%-int8 mixes."""
    n = len(layers)
    rng = np.random.default_rng(1)
    int8, fp32 = Precision.INT8, Precision.FP32
    return {
        "first half int8": {lid: int8 if i < n // 2 else fp32 for i, lid in enumerate(layers)},
        "second half int8": {lid: fp32 if i < n // 2 else int8 for i, lid in enumerate(layers)},
        "alternate": {lid: int8 if i % 2 else fp32 for i, lid in enumerate(layers)},
        **{
            f"random 80% int8 #{k}": {lid: int8 if rng.random() < 0.8 else fp32 for lid in layers}
            for k in (1, 2, 3)
        },
    }


def bench(name: str, model, board: LoopbackBoard, spec, db: LatencyDatabase, repeats: int) -> dict:
    imported = load_onnx(model)
    annotated = AnnotateCandidates(list(PLANS), pin_first_last=False)(imported.mod)
    workloads = extract_workloads(annotated)
    measurer = Measurer(board, spec, db, timing=TIMING)
    started = time.perf_counter()
    summary = measurer.run(workloads.unique())
    print(f"{name}: {summary.measured} workloads measured, {len(summary.failed)} failed", flush=True)
    measure_s = time.perf_counter() - started
    latencies = measurer.latencies(workloads.unique())
    started = time.perf_counter()
    scales = measured_scales(measurer, imported, workloads, progress=print)
    whole_s = time.perf_counter() - started
    in_model = scales.apply(workloads, latencies)
    layers = quantizable_layers(imported.mod)
    calibration = calibrate(imported, "minmax", num_samples=4)
    plans = {p.value: Plan.uniform(layers, p).assignments for p in PLANS} | mixed_plans(
        list(workloads.layers)
    )
    libraries = {}
    with tempfile.TemporaryDirectory() as scratch:
        for index, (label, assignments) in enumerate(plans.items()):
            plan = Plan(dict(assignments))
            integer = any(p.is_integer for p in plan.assignments.values())
            mod = ApplyPlan(plan, calibration if integer else None)(imported.mod)
            libraries[label] = Path(scratch) / f"{name}_{index}.so"
            build_executable(mod, spec).export_library(str(libraries[label]))
        # Timed like the uniform plans above: interleaved rounds, each once the board is quiet.
        timed = time_with_measurer(measurer, libraries, imported, rounds=repeats)
    rows = {}
    for label, assignments in plans.items():
        parts = plan_latency(workloads, assignments, latencies)
        scaled = plan_latency(workloads, assignments, in_model)
        measured = timed[label].median_ms
        rows[label] = {
            "fitted": label in {p.value for p in scales.runs},
            "counts": Plan(dict(assignments)).counts(),
            "parts_ms": parts.total_ms,
            "in_model_ms": scaled.total_ms,
            "measured_ms": measured,
            "parts_ratio": parts.total_ms / measured,
            "in_model_ratio": scaled.total_ms / measured,
            "parts_by_kind_ms": parts.by_kind(),
            "measured_repeats_ms": list(timed[label].repeats_ms),
            "parts": [
                {"part": what, "workload": w.key, "label": w.label, "ms": ms} for what, w, ms in parts.parts
            ],
        }
        print(
            f"{name} {label}: parts {parts.total_ms:.2f}, in-model {scaled.total_ms:.2f}, measured "
            f"{measured:.2f} ms",
            flush=True,
        )
    return latencies, {
        "model": name,
        "workloads": summary.total,
        "measured_now": summary.measured,
        "failed": summary.failed,
        "measure_seconds": measure_s,
        "whole_model_seconds": whole_s,
        "quiet_gate": measurer.gate.to_json(),
        "retimed": summary.retimed,
        "in_model": scales.to_json(),
        "plans": rows,
    }


def main() -> None:
    args = parse_args(__doc__, repeats=5, extra={"--models": ",".join(CASES)})
    spec = resolve_target("host")
    names = [n for n in args.models.split(",") if n]
    load_before = os.getloadavg()  # the host is shared: other work skews both sides of the ratio
    with scratch_host_board("oqa-bench") as (board, db):
        measured = {n: bench(n, CASES[n](), board, spec, db, args.repeats) for n in names}
        rows = {m.workload.key: m for m in db.measurements() if m.ok}
    results = [record for _, record in measured.values()]
    latency_model = _latency_model(names, measured, rows)
    record = {
        **machine_record(spec.tvm_target()),
        "timing": {
            "repeat": TIMING.repeat,
            "min_repeat_ms": TIMING.min_repeat_ms,
            "e2e_rounds": args.repeats,
            "measurement": schedule_label("default"),
        },
        "accept_ratio": list(ACCEPT),
        "load_average_1_5_15": {"before": list(load_before), "after": list(os.getloadavg())},
        "results": results,
        "latency_model": latency_model,
    }
    lines = [
        "# OQA composition: sum of measured parts vs the whole model, host board (loopback RPC)",
        "",
        f"Zero-budget schedule (measurements `{schedule_label('default')}`: each part's kernels timed "
        f"with their weights and output flushed from the caches, input warm), {TIMING.repeat} repeats x "
        f">= {TIMING.min_repeat_ms} ms per timing; end-to-end is the median of {args.repeats} interleaved "
        "rounds. Every timing, parts and whole models alike, starts once the board runs at its usual "
        "speed (the canary of `ohq_tvm.oqa.quiet`) and is redone if it slowed down meanwhile. "
        "*parts*: the sum of the parts as measured alone; *in-model*: each layer scaled by its "
        "precision's factor, fitted on the uniform fp32 and int8 plans timed whole in a separate run "
        "(`ohq_tvm.oqa.in_model`, what planning uses). The mixed plans were not fitted on. "
        f"Accepted when the ratio is in {ACCEPT[0]}..{ACCEPT[1]}.",
        "",
        "| model | plan | layers fp32/int8 | parts ms | in-model ms | measured ms | parts / measured "
        "| in-model / measured |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        for plan, row in result["plans"].items():
            counts = row["counts"]
            lines.append(
                f"| {result['model']} | {plan}{' (fitted)' if row['fitted'] else ''} | "
                f"{counts.get('fp32', 0)}/{counts.get('int8', 0)} | {row['parts_ms']:.2f} | "
                f"{row['in_model_ms']:.2f} | {row['measured_ms']:.2f} | {row['parts_ratio']:.3f} | "
                f"{row['in_model_ratio']:.3f} |"
            )
    lines.append("")
    for result in results:
        held_out = [row for row in result["plans"].values() if not row["fitted"]]
        for key, label in (("parts_ratio", "parts"), ("in_model_ratio", "in-model")):
            errors = [abs(row[key] - 1) * 100 for row in held_out]
            lines.append(
                f"- {result['model']}, {label}, mixed plans: mean |error| {statistics.mean(errors):.1f}%, "
                f"worst {max(errors):.1f}%"
            )
        scales = ", ".join(f"{p} x{run['scale']:.3f}" for p, run in result["in_model"].items())
        lines.append(f"- {result['model']}: in-model factors {scales}")
    lines.append("")
    for result in results:
        lines.append(
            f"{result['model']}: {result['workloads']} unique workloads measured in "
            f"{result['measure_seconds']:.0f} s, {len(result['failed'])} failed; uniform plans built and "
            f"timed whole in {result['whole_model_seconds']:.0f} s."
        )
    loads = record["load_average_1_5_15"]
    lines.append(
        "Host load average (1/5/15 min) before: "
        + ", ".join(f"{v:.2f}" for v in loads["before"])
        + "; after: "
        + ", ".join(f"{v:.2f}" for v in loads["after"])
        + "."
    )
    if latency_model:
        lines += [
            "",
            "XGBoost latency model (features: MACs, bytes, shapes, kernel, precision, op kind):",
            "",
        ]
        lines.append(
            f"- {latency_model['cv_folds']}-fold cross-validated MAPE over all {latency_model['rows']} "
            f"measured workloads: {latency_model['cv_mape_percent']:.1f}%"
        )
        for item in latency_model.get("cross_model", []):
            lines.append(
                f"- trained on {item['train']} only, predicting the {item['predicted']} workloads of "
                f"{item['test']} it has not seen: MAPE {item['mape_percent']:.1f}%"
            )
    write_results(args.out, "oqa_composition", record, lines)


def _latency_model(names, measured, rows) -> dict:
    """CV error over every row, and each model's unseen workloads predicted from the other's rows."""
    if len(rows) < MIN_TRAINING_ROWS:
        return {}
    workloads = [m.workload for m in rows.values()]
    model = LatencyModel.train(workloads, [m.median_ms for m in rows.values()])
    report = {"rows": len(rows), "cv_folds": model.folds, "cv_mape_percent": model.cv_mape_percent}
    cross = []
    for train in names:
        for test in names:
            if train == test:
                continue
            seen = set(measured[train][0])
            train_rows = [rows[k] for k in seen if k in rows]
            unseen = [rows[k] for k in measured[test][0] if k not in seen and k in rows]
            if len(train_rows) < MIN_TRAINING_ROWS or not unseen:
                continue
            fitted = LatencyModel.train([m.workload for m in train_rows], [m.median_ms for m in train_rows])
            predicted = fitted.predict_ms([m.workload for m in unseen])
            actual = np.array([m.median_ms for m in unseen])
            cross.append(
                {
                    "train": train,
                    "test": test,
                    "predicted": len(unseen),
                    "mape_percent": mape(predicted, actual),
                }
            )
    report["cross_model"] = cross
    return report


if __name__ == "__main__":
    with sigterm_as_exit():  # a killed run still takes its loopback board down
        main()
