"""Slow spells of this machine, and whether the quiet gate's canary sees them.

Usage: python benchmarks/quiet_spells.py [--seconds 100] [--out benchmarks/results]

In one process (TVM on every core), for ``--seconds``: MobileNetV2 fp32 (default schedule, 10 runs
averaged), then a compute-bound kernel (a 64-deep polynomial per element, parallel over rows), a
streaming kernel (parallel sums over 16 MB), and the gate's canary (``ohq_tvm.oqa.quiet``: a buffer
written parallel over rows and read parallel over columns), each averaged over 20 runs, back to back,
over and over. A sample is *slow* when the model took over 1.4x its fastest. Reported per kernel: median
in fast and in slow samples and their ratio; the share of slow samples; how often the canary's own verdict
(over the gate's 1.25x of its fastest) agrees with the model's.

Writes results/quiet_spells.json (every sample) and results/quiet_spells.md.
"""

from __future__ import annotations

import time

import numpy as np
import tvm
from tvm import s_tir, te, tirx

from ohq_tvm import models
from ohq_tvm.board import host_vm, sigterm_as_exit, use_host_threads
from ohq_tvm.codegen.module import build_executable
from ohq_tvm.frontend import load_onnx
from ohq_tvm.oqa.quiet import CANARY_SYMBOL, QuietGate, canary_executable
from ohq_tvm.targets import resolve_target

from timing import machine_record, parse_args, write_results

SLOW = 1.4  # a model sample over this times its fastest is in a slow spell


def _scheduled(outputs, inputs, axes_to_vectorize: int = 0) -> tvm.IRModule:
    sch = s_tir.Schedule(te.create_prim_func([*inputs, outputs]))
    block = sch.get_sblock(outputs.op.name)
    loops = sch.get_loops(block)
    sch.parallel(loops[0])
    if axes_to_vectorize:
        _, inner = sch.split(loops[1], [None, axes_to_vectorize])
        sch.vectorize(inner)
    return tvm.IRModule({"main": sch.mod["main"].with_attr("global_symbol", "main")})


def compute_kernel():
    a = te.placeholder((256, 1024), "float32", name="a")

    def polynomial(i, j):
        y = a[i, j]
        for _ in range(64):
            y = y * a[i, j] + tirx.const(0.5, "float32")
        return y

    return _scheduled(te.compute((256, 1024), polynomial, name="b"), [a], 16), [(256, 1024)] * 2


def streaming_kernel():
    a = te.placeholder((64, 65536), "float32", name="a")
    k = te.reduce_axis((0, 65536), "k")
    return _scheduled(te.compute((64,), lambda i: te.sum(a[i, k], axis=k), name="b"), [a]), [
        (64, 65536),
        (64,),
    ]


def main() -> None:
    args = parse_args(__doc__, repeats=0, extra={"--seconds": "100"})
    use_host_threads()
    spec = resolve_target("host")
    target = spec.tvm_target()
    rng = np.random.default_rng(0)
    timers = {}
    for name, (mod, shapes) in {"compute": compute_kernel(), "streaming": streaming_kernel()}.items():
        module = tvm.compile(mod, target=target).jit()
        arrays = [tvm.runtime.tensor((rng.random(s) * 0.5).astype("float32")) for s in shapes]
        timers[name] = (module.time_evaluator("main", tvm.cpu(), number=20, repeat=1), arrays)
    canary = canary_executable(target).jit()
    arrays = [tvm.runtime.tensor(rng.random((512, 512)).astype("float32")) for _ in range(2)]
    timers["canary"] = (canary.time_evaluator(CANARY_SYMBOL, tvm.cpu(), number=20, repeat=1), arrays)
    imported = load_onnx(models.mobilenet_v2())
    vm = host_vm(build_executable(imported.mod, spec))
    x = tvm.runtime.tensor(rng.standard_normal(imported.inputs[0].shape).astype("float32"))
    timers = {"mobilenet_v2": (vm.time_evaluator("main", tvm.cpu(), number=10, repeat=1), [x]), **timers}
    samples: dict[str, list[float]] = {name: [] for name in timers}
    started = time.time()
    while time.time() - started < float(args.seconds):
        for name, (evaluator, inputs) in timers.items():
            samples[name].append(evaluator(*inputs).results[0] * 1e3)
    values = {name: np.array(v) for name, v in samples.items()}
    model = values["mobilenet_v2"]
    slow = model > SLOW * model.min()
    rows = {}
    for name, v in values.items():
        fast_ms = float(np.median(v[~slow]))
        slow_ms = float(np.median(v[slow])) if slow.any() else None
        rows[name] = {"fast_ms": fast_ms, "slow_ms": slow_ms, "ratio": slow_ms / fast_ms if slow_ms else None}
    canary_slow = values["canary"] > QuietGate().tolerance * values["canary"].min()
    record = {
        **machine_record(target),
        "seconds": float(args.seconds),
        "samples": len(model),
        "slow_share": float(slow.mean()),
        "canary_agreement": float((canary_slow == slow).mean()),
        "kernels": rows,
        "raw_ms": samples,
    }
    lines = [
        "# Slow spells of this machine, and the quiet gate's canary",
        "",
        f"{record['samples']} samples over {args.seconds} s, one process, TVM on "
        f"{record['machine']['tvm_threads']} threads. A sample is slow when MobileNetV2 took over {SLOW}x "
        f"its fastest: {100 * record['slow_share']:.0f}% of them.",
        "",
        "| kernel | median fast ms | median slow ms | slow / fast |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, row in rows.items():
        slow_text = "-" if row["slow_ms"] is None else f"{row['slow_ms']:.3f}"
        ratio = "-" if row["ratio"] is None else f"{row['ratio']:.2f}"
        lines.append(f"| {name} | {row['fast_ms']:.3f} | {slow_text} | {ratio} |")
    lines += [
        "",
        f"The canary's own verdict (slow when over {QuietGate().tolerance}x its fastest) agrees with the "
        f"model's on {100 * record['canary_agreement']:.0f}% of the samples.",
    ]
    write_results(args.out, "quiet_spells", record, lines)


if __name__ == "__main__":
    with sigterm_as_exit():  # a killed run still takes its loopback board down
        main()
