"""Uniform int8 / int4w plans vs fp32: agreement with ONNX Runtime's QDQ run, error, and latency, one run.

Usage: python benchmarks/quantized.py [--repeats N] [--out benchmarks/results]

For each generated model (random weights: this measures the arithmetic and the kernels, not accuracy on
real data), calibrated with minmax on 8 synthetic Gaussian batches:

- deviation of the TVM module from ONNX Runtime running the plan's QDQ export (same integer arithmetic),
  and from the fp32 model (the quantization error), on 4 held-out synthetic inputs;
- latency of TVM fp32 / int8 / int4w (zero-budget schedule, no tuning) next to ONNX Runtime fp32 and
  ONNX Runtime on the int8 QDQ export, timed in interleaved rounds.

Writes results/quantized.json (machine, versions, raw per-repeat milliseconds) and results/quantized.md.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import tvm

from ohq_tvm import Precision, models
from ohq_tvm.board import host_vm, sigterm_as_exit
from ohq_tvm.calibration import calibrate, synthetic_batches
from ohq_tvm.codegen import build_scheduled
from ohq_tvm.frontend import load_onnx
from ohq_tvm.layers import quantizable_layers
from ohq_tvm.passes import ApplyPlan
from ohq_tvm.plan import Plan
from ohq_tvm.qdq import export_qdq
from ohq_tvm.targets import resolve_target

from timing import interleaved, machine_record, ort_timer, parse_args, tvm_timer, write_results

CASES = {
    "tiny_cnn (32x32)": models.tiny_cnn,
    "mobilenet_v2 (224x224)": models.mobilenet_v2,
}
PRECISIONS = (Precision.INT8, Precision.INT4W)
HELD_OUT = 4


def _run_tvm(executable, inputs: list[np.ndarray]) -> list[np.ndarray]:
    vm = host_vm(executable)
    return [vm["main"](tvm.runtime.tensor(x)).numpy() for x in inputs]


def _run_ort(model, name: str, inputs: list[np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return [session.run(None, {name: x})[0] for x in inputs]


def _relative_max(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    """Largest |a - b| over the inputs, relative to the largest |b|."""
    return max(float(np.abs(x - y).max() / np.abs(y).max()) for x, y in zip(a, b, strict=True))


def _relative_l2(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return max(float(np.linalg.norm(x - y) / np.linalg.norm(y)) for x, y in zip(a, b, strict=True))


def bench(name: str, model, target, repeats: int, threads: int) -> dict:
    imported = load_onnx(model)
    (spec,) = imported.inputs
    calibration = calibrate(imported, "minmax", num_samples=8)
    held_out = [b[spec.name] for b in synthetic_batches(imported.inputs, HELD_OUT, seed=1000)]
    fp32 = build_scheduled(imported.mod, target)
    fp32_out = _run_tvm(fp32, held_out)
    args = [tvm.runtime.tensor(held_out[0])]
    timers = {
        "tvm_fp32": tvm_timer(fp32, args),
        "onnxruntime_fp32": ort_timer(imported.onnx_model, {spec.name: held_out[0]}, threads),
    }
    quality = {}
    layers = quantizable_layers(imported.mod)
    for precision in PRECISIONS:
        plan = Plan.uniform(layers, precision)
        executable = build_scheduled(ApplyPlan(plan, calibration)(imported.mod), target)
        qdq = export_qdq(imported, plan, calibration)
        out = _run_tvm(executable, held_out)
        quality[precision.value] = {
            "max_deviation_from_ort_qdq": _relative_max(out, _run_ort(qdq, spec.name, held_out)),
            "l2_error_vs_fp32": _relative_l2(out, fp32_out),
            "top1_agreement_with_fp32": float(
                np.mean([(o.argmax() == f.argmax()) for o, f in zip(out, fp32_out, strict=True)])
            ),
        }
        timers[f"tvm_{precision.value}"] = tvm_timer(executable, args)
        if precision is Precision.INT8:
            timers["onnxruntime_qdq_int8"] = ort_timer(qdq, {spec.name: held_out[0]}, threads)
    median, raw = interleaved(timers, repeats)
    return {"case": name, "quality": quality, "median_ms": median, "raw_ms": raw}


def main() -> None:
    args = parse_args(__doc__, repeats=5)
    board = resolve_target("host")
    target = board.tvm_target()
    threads = board.num_cores
    results = [bench(name, make(), target, args.repeats, threads) for name, make in CASES.items()]
    record = {
        "benchmark": "quantized",
        **machine_record(target),
        "settings": {
            "repeats": args.repeats,
            "calibration": "minmax, 8 synthetic gaussian batches",
            "held_out_inputs": HELD_OUT,
            "onnxruntime_threads": threads,
            "tuning_trials": 0,
            "weights": "random (generated models)",
        },
        "results": results,
    }
    lines = [
        "# Uniform integer plans vs fp32 (random weights, no tuning)",
        "",
        f"Machine: {record['machine']['cpu']}, {record['machine']['cores']} cores; TVM {tvm.__version__}, "
        f"ONNX Runtime {ort.__version__} ({threads} threads); median of {args.repeats} interleaved rounds; "
        f"errors are the worst of {HELD_OUT} held-out synthetic inputs.",
        "",
        "| model | plan | max deviation from ORT on the QDQ export | L2 error vs fp32 | top-1 = fp32 |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for r in results:
        for precision, q in r["quality"].items():
            lines.append(
                f"| {r['case']} | {precision} | {q['max_deviation_from_ort_qdq']:.1e} | "
                f"{q['l2_error_vs_fp32']:.3f} | {q['top1_agreement_with_fp32']:.0%} |"
            )
    lines += [
        "",
        "| model | TVM fp32 (ms) | TVM int8 (ms) | TVM int4w (ms) | ORT fp32 (ms) | ORT QDQ int8 (ms) "
        "| TVM int8 / TVM fp32 | TVM int8 / ORT int8 |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        m = r["median_ms"]
        lines.append(
            f"| {r['case']} | {m['tvm_fp32']:.3f} | {m['tvm_int8']:.3f} | {m['tvm_int4w']:.3f} | "
            f"{m['onnxruntime_fp32']:.3f} | {m['onnxruntime_qdq_int8']:.3f} | "
            f"{m['tvm_int8'] / m['tvm_fp32']:.2f}x | {m['tvm_int8'] / m['onnxruntime_qdq_int8']:.1f}x |"
        )
    write_results(args.out, "quantized", record, lines)


if __name__ == "__main__":
    with sigterm_as_exit():  # a killed run still takes its loopback board down
        main()
