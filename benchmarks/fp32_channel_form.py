"""fp32 1x1 convs on 14x14 and 7x7 maps: the channel form against the default schedule, side by side.

Usage: python benchmarks/fp32_channel_form.py [--repeats 15] [--quiet-wait 3] [--out benchmarks/results]

A float 1x1 conv over a map whose pixel count no fp32 vector width divides (196 and 49 pixels with AVX2's
8 lanes) is rewritten by ``UseCPUKernels`` into the channel form of the int8 kernels with fp32
multiply-adds (lanes over output channels, one activation broadcast per multiply-add; see
``ohq_tvm.kernels.isa``). Before, it went to the default conv schedule, whose vectors along the pixels
are then 4 wide. This script builds each MobileNetV2 / EfficientNet-Lite0 layer shape of that kind (and
one 28x28 layer, which keeps the default schedule either way, as a control), and the generated
MobileNetV2 whole, both ways in one process: "channel form" as ohq-tvm builds it, "pixel vectors" with the
rewrite switched off. Both are timed in interleaved rounds on the host's threads.

Writes results/fp32_channel_form.json (machine, versions, raw milliseconds) and .md (medians, ratios).
"""

from __future__ import annotations

from unittest import mock

import numpy as np
import tvm

from ohq_tvm import Precision, models
from ohq_tvm.board import host_vm, sigterm_as_exit
from ohq_tvm.codegen import build_executable
from ohq_tvm.frontend import load_onnx, synthetic_inputs
from ohq_tvm.oqa.quiet import QuietGate
from ohq_tvm.oqa.workloads import Workload
from ohq_tvm.passes import cpu_kernels
from ohq_tvm.targets import resolve_target

from timing import BenchmarkRun, conditions, interleaved, parse_args, tvm_timer

FORMS = ("channel form", "pixel vectors")


def pointwise(cin: int, cout: int, size: int, activation: str | None = "clip:0:6") -> dict:
    return {
        "input_shape": (1, cin, size, size),
        "output_shape": (1, cout, size, size),
        "weight_shape": (cout, cin, 1, 1),
        "strides": (1, 1),
        "padding": (0, 0, 0, 0),
        "dilation": (1, 1),
        "groups": 1,
        "bias": True,
        "activation": activation,
    }


LAYERS = {
    "expand 64->384 14x14": pointwise(64, 384, 14),
    "project 384->96 14x14": pointwise(384, 96, 14, None),
    "expand 96->576 14x14": pointwise(96, 576, 14),
    "project 576->96 14x14": pointwise(576, 96, 14, None),
    "expand 80->480 14x14 (Lite0)": pointwise(80, 480, 14),
    "expand 160->960 7x7": pointwise(160, 960, 7),
    "project 960->160 7x7": pointwise(960, 160, 7, None),
    "expand 320->1280 7x7": pointwise(320, 1280, 7),
    "expand 32->192 28x28 (control)": pointwise(32, 192, 28),
}


def build(module: tvm.IRModule, board, form: str):
    """``module`` as ohq-tvm builds it, or with the fp32 channel form switched off."""
    if form == "channel form":
        return build_executable(module, board)
    with mock.patch.object(cpu_kernels, "float_isa", lambda _target: None):
        return build_executable(module, board)


def time_case(name: str, module: tvm.IRModule, arrays: list[np.ndarray], board, rounds: int, gate) -> dict:
    args = [tvm.runtime.tensor(a) for a in arrays]
    executables = {form: build(module, board, form) for form in FORMS}
    outputs = {form: host_vm(ex)["main"](*args).numpy() for form, ex in executables.items()}
    deviation = float(np.abs(outputs[FORMS[0]] - outputs[FORMS[1]]).max())
    median, raw = interleaved({form: tvm_timer(ex, args) for form, ex in executables.items()}, rounds, gate)
    return {
        "case": name,
        "median_ms": median,
        "speedup": median["pixel vectors"] / median["channel form"],
        "max_abs_difference": deviation,
        "raw_ms": raw,
    }


def markdown(record: dict) -> list[str]:
    lines = [
        "# fp32 1x1 convs on maps no vector width divides: channel form vs pixel vectors",
        "",
        f"Machine: {record['machine']['cpu']}, {record['machine']['tvm_threads']} TVM threads. "
        + conditions(record),
        "",
        "| case | channel form ms | pixel vectors ms | speedup | max abs difference |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for row in record["cases"]:
        m = row["median_ms"]
        lines.append(
            f"| {row['case']} | {m['channel form']:.3f} | {m['pixel vectors']:.3f} | {row['speedup']:.2f}x "
            f"| {row['max_abs_difference']:.1e} |"
        )
    return lines


def main() -> None:
    args = parse_args(__doc__, repeats=15, extra={"--quiet-wait": "3"})
    sigterm_as_exit()
    board = resolve_target("host")
    run = BenchmarkRun("fp32_channel_form", board.tvm_target(), QuietGate(max_wait_s=float(args.quiet_wait)))
    cases = []
    for name, shape in LAYERS.items():
        workload = Workload("layer", "conv2d", Precision.FP32, **shape, input_zero_point=False)
        run.say(name)
        cases.append(
            time_case(name, workload.module(), workload.synthetic_inputs(), board, args.repeats, run.gate)
        )
    imported = load_onnx(models.mobilenet_v2())
    feeds = synthetic_inputs(imported.inputs)
    run.say("mobilenet_v2 fp32 (generated, 224x224)")
    arrays = [feeds[spec.name] for spec in imported.inputs]
    cases.append(
        time_case("MobileNetV2 fp32 whole (generated)", imported.mod, arrays, board, args.repeats, run.gate)
    )
    run.write(args.out, {"repeats": args.repeats, "forms": list(FORMS)}, markdown, cases=cases)


if __name__ == "__main__":
    main()
