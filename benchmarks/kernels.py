"""Kernels: fp32 vs int8 per operator at the same trial budget, and whole models against ONNX Runtime.

Per operator (MobileNet/EfficientNet shapes: conv 3x3, 1x1, depthwise, dense 1024x1024), each in fp32 and in
int8 exactly as a plan runs it (uint8 in, int8 weights, int32 accumulation, requantize to uint8 out):

- ``default``: the zero-budget build (the ohq-tvm default schedule; int8 regular convs and dense on the
  CPU's dot-product instruction when it has one, depthwise in exact float arithmetic);
- ``tuned``: MetaSchedule with ``--trials`` measured candidates per operator and precision, tuned over
  the loopback host board (RPC) into a fresh database, built with the records.

Whole models (generated MobileNetV2 and EfficientNet-Lite0 architectures, random weights: latency does
not depend on the values): TVM's own unscheduled build, the default schedule and (with
``--model-trials``) a tuned build, fp32 and uniform int8, against ONNX Runtime fp32 and ONNX Runtime
int8 on the same plan's QDQ export (static, per-channel weights). Every timing of a table is taken in
the same interleaved rounds, in this process, on this machine.

    python benchmarks/kernels.py [--trials 64] [--model-trials 0] [--repeats 7] [--models a,b]

``--trials -1`` skips the operators and ``--models ""`` the models (results then go to
``kernels_models`` / ``kernels_ops`` instead of ``kernels``), so the two halves can run apart.
"""

from __future__ import annotations

import os
import tempfile
import time

import onnxruntime as ort
import tvm

from ohq_tvm import Precision, models
from ohq_tvm.board import LoopbackBoard, sigterm_as_exit
from ohq_tvm.build import build_executable, tune_module
from ohq_tvm.calibration import calibrate
from ohq_tvm.frontend import load_onnx, synthetic_inputs
from ohq_tvm.kernels import dot_product_isa
from ohq_tvm.layers import quantizable_layers
from ohq_tvm.oqa.workloads import Workload
from ohq_tvm.passes import ApplyPlan
from ohq_tvm.plan import Plan
from ohq_tvm.qdq import export_qdq
from ohq_tvm.targets import resolve_target

from timing import interleaved, machine_record, ort_timer, parse_args, tvm_timer, write_results


def _conv(name, cin, cout, size, kernel, stride, groups=1, act="clip:0:6"):
    pad = kernel // 2
    out = (size + 2 * pad - kernel) // stride + 1
    shape = dict(
        input_shape=(1, cin, size, size),
        output_shape=(1, cout, out, out),
        weight_shape=(cout, cin // groups, kernel, kernel),
        strides=(stride, stride),
        padding=(pad,) * 4,
        dilation=(1, 1),
        groups=groups,
        bias=True,
        activation=act,
    )
    return name, shape


OPS = [
    _conv("conv 3x3 64->64 56x56", 64, 64, 56, 3, 1, act="relu"),
    _conv("conv 3x3 3->32 224x224 s2 (stem)", 3, 32, 224, 3, 2),
    _conv("conv 1x1 16->96 112x112", 16, 96, 112, 1, 1),
    _conv("conv 1x1 24->144 56x56", 24, 144, 56, 1, 1),
    _conv("conv 1x1 96->24 56x56", 96, 24, 56, 1, 1, act=None),
    _conv("conv 1x1 320->1280 7x7", 320, 1280, 7, 1, 1),
    _conv("depthwise 3x3 144 56x56", 144, 144, 56, 3, 1, groups=144),
    _conv("depthwise 3x3 96 112x112 s2", 96, 96, 112, 3, 2, groups=96),
    (
        "dense 1024x1024 (batch 1)",
        dict(input_shape=(1, 1024), output_shape=(1, 1024), weight_shape=(1024, 1024), bias=True),
    ),
]
MODELS = ("mobilenet_v2", "efficientnet_lite0")


def _workload(shape: dict, precision: Precision) -> Workload:
    op = "dense" if len(shape["input_shape"]) == 2 else "conv2d"
    return Workload("layer", op, precision, **shape, input_zero_point=False)


def _tune(mod, spec, board, trials, tuning_dir):
    started = time.perf_counter()
    result = tune_module(mod, spec, board, trials, tuning_dir=tuning_dir)
    return build_executable(mod, spec, tuning=result.database), {
        "trials_measured": result.trials_measured,
        "trials_failed": result.trials_failed,
        "tasks": len(result.tasks),
        "wall_s": round(time.perf_counter() - started, 1),
    }


def bench_ops(spec, board, trials: int, repeats: int, tuning_dir: str) -> list[dict]:
    rows = []
    for name, shape in OPS:
        timers, tuning = {}, {}
        for precision in (Precision.FP32, Precision.INT8):
            workload = _workload(shape, precision)
            mod = workload.module()
            args = [tvm.runtime.tensor(a) for a in workload.synthetic_inputs()]
            timers[f"{precision}_default"] = tvm_timer(build_executable(mod, spec), args)
            if trials:
                executable, tuning[str(precision)] = _tune(mod, spec, board, trials, tuning_dir)
                timers[f"{precision}_tuned"] = tvm_timer(executable, args)
        median, raw = interleaved(timers, repeats)
        rows.append({"op": name, "macs": workload.macs, "median_ms": median, "raw_ms": raw, "tuning": tuning})
        print(f"{name}: " + ", ".join(f"{k} {v:.3f} ms" for k, v in median.items()), flush=True)
    return rows


def bench_model(name: str, spec, board, trials: int, repeats: int, tuning_dir: str) -> dict:
    imported = load_onnx(models.MODELS[name]())
    (input_spec,) = imported.inputs
    feeds = synthetic_inputs(imported.inputs, seed=3)
    args = [tvm.runtime.tensor(feeds[input_spec.name])]
    calibration = calibrate(imported, "minmax", num_samples=8)
    plan = Plan.uniform(quantizable_layers(imported.mod), Precision.INT8)
    int8 = ApplyPlan(plan, calibration)(imported.mod)
    qdq = export_qdq(imported, plan, calibration)
    timers = {
        "onnxruntime_fp32": ort_timer(imported.onnx_model, feeds, spec.num_cores),
        "onnxruntime_int8": ort_timer(qdq, feeds, spec.num_cores),
        "tvm_fp32_unscheduled": tvm_timer(build_executable(imported.mod, spec, schedule="none"), args),
        "tvm_fp32_default": tvm_timer(build_executable(imported.mod, spec), args),
        "tvm_int8_default": tvm_timer(build_executable(int8, spec), args),
    }
    tuning = {}
    if trials:
        for label, mod in (("fp32", imported.mod), ("int8", int8)):
            executable, tuning[label] = _tune(mod, spec, board, trials, tuning_dir)
            timers[f"tvm_{label}_tuned"] = tvm_timer(executable, args)
    median, raw = interleaved(timers, repeats)
    print(f"{name}: " + ", ".join(f"{k} {v:.3f} ms" for k, v in median.items()), flush=True)
    return {"model": name, "median_ms": median, "raw_ms": raw, "tuning": tuning}


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def _ms(value: float | None) -> str:
    return f"{value:.3f}" if value is not None else "-"


def main() -> None:
    extra = {"--trials": "64", "--model-trials": "0", "--tuning-dir": "", "--models": ",".join(MODELS)}
    args = parse_args(__doc__, repeats=7, extra=extra)
    trials, model_trials = int(args.trials), int(args.model_trials)
    spec = resolve_target("host")
    target = spec.tvm_target()
    isa = dot_product_isa(target)
    started = time.perf_counter()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="ohq-kernels-tuning-") as fresh, LoopbackBoard() as board:
        tuning_dir = args.tuning_dir or fresh
        ops = bench_ops(spec, board, trials, args.repeats, tuning_dir) if trials >= 0 else []
        names = [name for name in args.models.split(",") if name]
        whole = [bench_model(name, spec, board, model_trials, args.repeats, tuning_dir) for name in names]
    record = {
        "benchmark": "kernels",
        **machine_record(target),
        "settings": {
            "repeats": args.repeats,
            "trials_per_op_and_precision": trials,
            "trials_per_model": model_trials,
            "dot_product_instruction": isa.name if isa else None,
            "onnxruntime_threads": spec.num_cores,
            "tuning_database": "fresh per run" if not args.tuning_dir else args.tuning_dir,
            "weights": "random (synthetic workloads and generated model architectures)",
            "wall_s": round(time.perf_counter() - started, 1),
            "load_average_1_5_15_min": {"start": load_before, "end": os.getloadavg()},
        },
        "ops": ops,
        "models": whole,
    }
    lines = [
        "# Kernels: fp32 vs int8 per operator, and whole models vs ONNX Runtime",
        "",
        f"Machine: {record['machine']['cpu']}, {record['machine']['cores']} cores, dot-product instruction: "
        f"{isa.name if isa else 'none'}; TVM {tvm.__version__} ({record['machine']['tvm_threads']} threads), "
        f"ONNX Runtime {ort.__version__} ({spec.num_cores} threads); median of {args.repeats} interleaved "
        "rounds. Tuned = MetaSchedule on "
        "the loopback host board, fresh database.",
    ]
    if ops:
        lines += [
            "",
            f"Per operator ({trials} trials per operator and precision).",
            "",
            "| operator | fp32 default (ms) | int8 default (ms) | fp32 / int8 default "
            "| fp32 tuned (ms) | int8 tuned (ms) | fp32 / int8 tuned |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
    for row in ops:
        m = row["median_ms"]
        lines.append(
            f"| {row['op']} | {_ms(m['fp32_default'])} | {_ms(m['int8_default'])} | "
            f"{_ratio(m['fp32_default'], m['int8_default'])} | {_ms(m.get('fp32_tuned'))} | "
            f"{_ms(m.get('int8_tuned'))} | {_ratio(m.get('fp32_tuned'), m.get('int8_tuned'))} |"
        )
    if whole:
        lines += [
            "",
            f"Whole models (tuned: {model_trials} trials per model and precision"
            + ("; not run" if not model_trials else "")
            + ").",
            "",
            "| model | ORT fp32 | ORT int8 | TVM fp32 unscheduled | TVM fp32 default | TVM int8 default "
            "| TVM fp32 tuned | TVM int8 tuned | default vs unscheduled (fp32) | best TVM int8 / ORT int8 |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
    for row in whole:
        m = row["median_ms"]
        best_int8 = min(v for k, v in m.items() if k.startswith("tvm_int8"))
        lines.append(
            f"| {row['model']} | {_ms(m['onnxruntime_fp32'])} | {_ms(m['onnxruntime_int8'])} | "
            f"{_ms(m['tvm_fp32_unscheduled'])} | {_ms(m['tvm_fp32_default'])} | "
            f"{_ms(m['tvm_int8_default'])} | "
            f"{_ms(m.get('tvm_fp32_tuned'))} | {_ms(m.get('tvm_int8_tuned'))} | "
            f"{_ratio(m['tvm_fp32_unscheduled'], m['tvm_fp32_default'])} faster | "
            f"{best_int8 / m['onnxruntime_int8']:.2f} |"
        )
    part = "kernels" if ops and whole else "kernels_ops" if ops else "kernels_models"
    write_results(args.out, part, record, lines)


if __name__ == "__main__":
    with sigterm_as_exit():  # a killed run still takes its loopback board down
        main()
