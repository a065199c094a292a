"""Kernels: fp32 vs int8 per operator at the same trial budget, and whole models against the peers.

Per operator (MobileNet/EfficientNet shapes: conv 3x3, 1x1, depthwise, dense 1024x1024), each in fp32 and in
int8 exactly as a plan runs it (uint8 in, int8 weights, int32 accumulation, requantize to uint8 out):

- ``default``: the zero-budget build (the ohq-tvm default schedule; int8 regular convs and dense on the
  CPU's dot-product instruction when it has one, depthwise in exact float arithmetic);
- ``tuned``: MetaSchedule with ``--trials`` measured candidates per operator and precision, tuned over
  the loopback host board (RPC) into a fresh database, built with the records.

Whole models (MobileNetV2 and EfficientNet-Lite0 with their real ImageNet weights, as ``peers.py`` builds
them; the peers need the torch model and calibration photos): ``tvm fp32 unscheduled`` (TVM's own build),
``ohq-tvm fp32`` / ``ohq-tvm int8`` (the default schedule; uniform int8 calibrated minmax on the held-out
crops) and, with ``--model-trials``, ``ohq-tvm fp32 tuned`` / ``ohq-tvm int8 tuned``, against the peers
of ``peer_engines`` (``litert fp32`` / ``int8``, ``ort fp32``, ``ort int8 u8s8 qdq`` / ``qoperator``,
``ort int8 s8s8 qdq``) and ``ort int8 ohq-tvm qdq`` (ONNX Runtime on the uniform int8 plan's own QDQ
export). Every timing of a table is taken in the same interleaved rounds, in this process, on this
machine, every engine on TVM's threads.

    python benchmarks/kernels.py [--trials 64] [--model-trials 0] [--repeats 7] [--models a,b]
                                 [--quiet-wait 30]

(needs `make peers`: torch, the pretrained weights and photos, LiteRT with its converter and quantizer)

``--trials -1`` skips the operators and ``--models ""`` the models (results then go to
``kernels_models`` / ``kernels_ops`` instead of ``kernels``), so the two halves can run apart.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import onnxruntime as ort
import torch
import tvm
from accuracy import MODELS as PRETRAINED
from peer_engines import build_peers, peer_settings, real_model, target_lines

from ohq_tvm import Precision
from ohq_tvm.board import LoopbackBoard, sigterm_as_exit, use_host_threads
from ohq_tvm.calibration import calibrate
from ohq_tvm.codegen import build_executable, tune_module
from ohq_tvm.frontend import load_onnx
from ohq_tvm.kernels import dot_product_isa
from ohq_tvm.layers import quantizable_layers
from ohq_tvm.oqa.quiet import QuietGate
from ohq_tvm.oqa.workloads import Workload
from ohq_tvm.passes import ApplyPlan
from ohq_tvm.plan import Plan
from ohq_tvm.qdq import export_qdq
from ohq_tvm.targets import resolve_target

from timing import (
    BenchmarkRun,
    Rounds,
    conditions,
    interleaved,
    ort_timer,
    parse_args,
    tvm_timer,
)


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


def bench_ops(spec, board, trials: int, rounds: Rounds, tuning_dir: str) -> list[dict]:
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
        median, raw = interleaved(timers, rounds.repeats, rounds.gate)
        rows.append({"op": name, "macs": workload.macs, "median_ms": median, "raw_ms": raw, "tuning": tuning})
        print(f"{name}: " + ", ".join(f"{k} {v:.3f} ms" for k, v in median.items()), flush=True)
    return rows


def bench_model(name: str, spec, board, trials: int, rounds: Rounds, tuning_dir: str, scratch: Path) -> dict:
    model = real_model(PRETRAINED[name], scratch / name)
    x = model.photos.views[0]
    imported = load_onnx(model.with_bn)
    (input_spec,) = imported.inputs
    samples = [{input_spec.name: crop} for crop in model.photos.calibration]
    calibration = calibrate(imported, "minmax", samples=samples)
    plan = Plan.uniform(quantizable_layers(imported.mod), Precision.INT8)
    int8 = ApplyPlan(plan, calibration)(imported.mod)
    args = [tvm.runtime.tensor(x)]
    timers = {
        "tvm fp32 unscheduled": tvm_timer(build_executable(imported.mod, spec, schedule="none"), args),
        "ohq-tvm fp32": tvm_timer(build_executable(imported.mod, spec), args),
        "ohq-tvm int8": tvm_timer(build_executable(int8, spec), args),
    }
    tuning = {}
    if trials:
        for label, mod in (("fp32", imported.mod), ("int8", int8)):
            executable, tuning[label] = _tune(mod, spec, board, trials, tuning_dir)
            timers[f"ohq-tvm {label} tuned"] = tvm_timer(executable, args)
    qdq = export_qdq(imported, plan, calibration)
    timers["ort int8 ohq-tvm qdq"] = ort_timer(qdq, {input_spec.name: x}, rounds.threads)
    peers = build_peers(model, scratch / name, rounds.threads)
    timers |= {engine: peer.timer for engine, peer in peers.items()}
    median, raw = interleaved(timers, rounds.repeats, rounds.gate)
    print(f"{name}: " + ", ".join(f"{k} {v:.3f} ms" for k, v in median.items()), flush=True)
    return {"model": name, "median_ms": median, "raw_ms": raw, "tuning": tuning}


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def _ms(value: float | None) -> str:
    return f"{value:.3f}" if value is not None else "-"


def markdown(record: dict) -> list[str]:
    settings, machine = record["settings"], record["machine"]
    ops, whole, trials = record["ops"], record["models"], settings["trials_per_op_and_precision"]
    lines = [
        "# Kernels: fp32 vs int8 per operator, and whole models against the peers",
        "",
        f"Machine: {machine['cpu_model'].get('model name', '?')} ({machine['cpu']}), {machine['cores']} "
        f"cores, dot-product instruction: {settings['dot_product_instruction'] or 'none'}; every engine on "
        f"{settings['threads']} threads; TVM {tvm.__version__}, ONNX Runtime {ort.__version__}"
        + (f", LiteRT {settings['peers']['litert']}" if "peers" in settings else "")
        + f". {conditions(record)} Tuned = MetaSchedule on the loopback host board, fresh database.",
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
    if not whole:
        return lines
    model_trials = settings["trials_per_model"]
    tuned = f"{model_trials} trials per model and precision" if model_trials else "not run"
    lines += [
        "",
        f"Whole models, ms (tuned: {tuned}; default = ohq-tvm's zero-budget schedule):",
        "",
        "| model | engine | latency ms | vs fastest engine |",
        "| --- | --- | ---: | ---: |",
    ]
    for row in whole:
        m = row["median_ms"]
        best = min(m.values())
        for engine in sorted(m, key=m.__getitem__):
            lines.append(f"| {row['model']} | {engine} | {_ms(m[engine])} | {m[engine] / best:.2f}x |")
    lines += ["", "Fastest engines, and ohq-tvm (default or tuned, the faster) against them (issue #25):", ""]
    lines += target_lines(
        whole, ("ohq-tvm int8", "ohq-tvm int8 tuned"), ("ohq-tvm fp32", "ohq-tvm fp32 tuned")
    )
    lines += ["", "ohq-tvm's default schedule against TVM's unscheduled build (fp32):", ""]
    for row in whole:
        m = row["median_ms"]
        lines.append(f"- {row['model']}: {_ratio(m['tvm fp32 unscheduled'], m['ohq-tvm fp32'])} faster")
    return lines


def main() -> None:
    extra = {"--trials": "64", "--model-trials": "0", "--tuning-dir": "", "--models": ",".join(MODELS)}
    args = parse_args(__doc__, repeats=7, extra=extra | {"--quiet-wait": "30"})
    trials, model_trials = int(args.trials), int(args.model_trials)
    spec = resolve_target("host")
    isa = dot_product_isa(spec.tvm_target())
    # How long a timing waits for the canary at its usual speed (as peers.py: 3 s on a host whose canary
    # never settles).
    gate = QuietGate(max_wait_s=float(args.quiet_wait))
    rounds = Rounds(args.repeats, use_host_threads(), gate)  # the peers on TVM's threads
    torch.set_num_threads(rounds.threads)
    run = BenchmarkRun("kernels", spec.tvm_target(), gate)
    with (
        tempfile.TemporaryDirectory(prefix="ohq-kernels-") as fresh,
        LoopbackBoard() as board,
    ):
        tuning_dir = args.tuning_dir or fresh
        ops = bench_ops(spec, board, trials, rounds, tuning_dir) if trials >= 0 else []
        names = [name for name in args.models.split(",") if name]
        scratch = Path(fresh) / "models"
        whole = [bench_model(n, spec, board, model_trials, rounds, tuning_dir, scratch) for n in names]
    settings = {
        "repeats": args.repeats,
        "trials_per_op_and_precision": trials,
        "trials_per_model": model_trials,
        "dot_product_instruction": isa.name if isa else None,
        "threads": rounds.threads,
        "tuning_database": "fresh per run" if not args.tuning_dir else args.tuning_dir,
        "weights": "ops: random (synthetic workloads); models: pretrained ImageNet (peers.py's models)",
        **({"peers": peer_settings()} if whole else {}),
    }
    part = "kernels" if ops and whole else "kernels_ops" if ops else "kernels_models"
    run.write(args.out, settings, markdown, part, ops=ops, models=whole)


if __name__ == "__main__":
    with sigterm_as_exit():  # a killed run still takes its loopback board down
        main()
