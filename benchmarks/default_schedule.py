"""Zero-budget schedule vs TVM's unscheduled default vs ONNX Runtime, fp32, side by side in one run.

Usage: python benchmarks/default_schedule.py [--repeats N] [--out benchmarks/results]

Writes results/default_schedule.json (machine, versions, raw per-repeat milliseconds) and
results/default_schedule.md (medians and ratios). The three runtimes are timed in interleaved rounds,
so drift on a noisy machine hits them alike.
"""

from __future__ import annotations

import time

import onnxruntime as ort
import tvm
from tvm import relax

from ohq_tvm import models
from ohq_tvm.board import sigterm_as_exit
from ohq_tvm.codegen import build_scheduled
from ohq_tvm.frontend import load_onnx, synthetic_inputs
from ohq_tvm.targets import resolve_target

from timing import interleaved, machine_record, ort_timer, parse_args, tvm_timer, write_results

CASES = {
    "mobilenet_v2 (224x224)": lambda: models.mobilenet_v2(),
    "dense 1024x1024 (batch 1)": lambda: models.gemm_model(features=1024, classes=1024),
    "tiny_cnn (32x32)": lambda: models.tiny_cnn(),
}


def bench(name: str, model, target, repeats: int, threads: int) -> dict:
    imported = load_onnx(model)
    feeds = synthetic_inputs(imported.inputs)
    args = [tvm.runtime.tensor(feeds[s.name], tvm.cpu()) for s in imported.inputs]
    started = time.perf_counter()
    scheduled = build_scheduled(imported.mod, target)
    build_s = time.perf_counter() - started
    timers = {
        "tvm_unscheduled": tvm_timer(relax.build(imported.mod, target), args),
        "tvm_default_schedule": tvm_timer(scheduled, args),
        "onnxruntime": ort_timer(imported.onnx_model, feeds, threads),
    }
    median, raw = interleaved(timers, repeats)
    return {
        "case": name,
        "schedule_build_s": round(build_s, 2),
        "median_ms": median,
        "speedup_vs_unscheduled": median["tvm_unscheduled"] / median["tvm_default_schedule"],
        "ratio_to_onnxruntime": median["tvm_default_schedule"] / median["onnxruntime"],
        "raw_ms": raw,
    }


def main() -> None:
    args = parse_args(__doc__, repeats=7)
    board = resolve_target("host")
    target = board.tvm_target()
    threads = board.num_cores
    results = [bench(name, make(), target, args.repeats, threads) for name, make in CASES.items()]
    record = {
        "benchmark": "default_schedule",
        **machine_record(target),
        "settings": {
            "repeats": args.repeats,
            "min_repeat_ms": 100,
            "onnxruntime_threads": threads,
            "tuning_trials": 0,
            "precision": "fp32",
        },
        "results": results,
    }
    lines = [
        "# Zero-budget CPU schedule (fp32, no tuning)",
        "",
        f"Machine: {record['machine']['cpu']}, {record['machine']['cores']} cores; TVM {tvm.__version__}, "
        f"ONNX Runtime {ort.__version__} ({threads} threads); median of {args.repeats} interleaved rounds.",
        "",
        "| model | TVM unscheduled (ms) | TVM default schedule (ms) | ONNX Runtime (ms) "
        "| speed-up vs unscheduled | default schedule / ORT |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        m = r["median_ms"]
        lines.append(
            f"| {r['case']} | {m['tvm_unscheduled']:.3f} | {m['tvm_default_schedule']:.3f} | "
            f"{m['onnxruntime']:.3f} | {r['speedup_vs_unscheduled']:.1f}x "
            f"| {r['ratio_to_onnxruntime']:.1f}x |"
        )
    write_results(args.out, "default_schedule", record, lines)


if __name__ == "__main__":
    with sigterm_as_exit():  # a killed run still takes its loopback board down
        main()
