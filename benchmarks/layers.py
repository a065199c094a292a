"""Layers: where the time goes, operator by operator, in ohq-tvm's modules against ONNX Runtime's.

Usage: python benchmarks/layers.py [--models mobilenet_v2,efficientnet_lite0] [--repeats 7] [--quiet-wait 3]
[--out ...] (needs `make peers`: the pretrained weights and the photos)

Per model (real ImageNet weights), engines built as peers.py builds them, on the same threads and photo:
``ohq-tvm int8`` (every layer, default schedule, no tuning), ``ohq-tvm fp32``, ``ort int8 u8s8 qdq`` (the
fastest engine on the Zen 3 host), ``ort int8 s8s8 qdq`` and ``ort fp32``.

- ohq-tvm: the Relax VM's instrument hook, called before and after every call the VM makes, times each call
  with ``perf_counter``. The arguments give a call's MACs (the output is the last argument; conv weights
  OIHW or packed, see :func:`tvm_call`). ``vm.builtin.*`` calls (allocations, shape checks) are runtime
  overhead, apart from the kernels;
- ONNX Runtime: its profiler's ``_kernel_time`` per node, which adds its own overhead; weight shapes from
  the graph ORT optimised (saved by another session: the profiler omits QLinearConv's prepacked weight);
- per call, the median of 30 profiled runs, which take turns, in blocks of 5, with as many plain runs of
  another VM / session; "outside kernels": each profiled run minus its own kernels (the hook's or profiler's
  cost included), and the plain runs' median minus the sum of the per-call medians;
- whole model: the median of ``--repeats`` interleaved rounds, uninstrumented (timing.interleaved).

Each conv / dense call's GMAC/s and % of this CPU's peak: an assumption stated by :func:`peak`, at the clock
/proc/cpuinfo reports. Writes results/layers.json (machine, peak, settings, every call with its shapes,
MACs, median / min / max µs; each run's wall time and kernel sum) and results/layers.md: per model, the time
per layer class in each engine, ohq-tvm int8's 10 slowest calls, the whole-model times and the overhead.
"""

from __future__ import annotations

import json
import math
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import tvm
from accuracy import MODELS
from peer_engines import ort_models, real_model

from ohq_tvm.board import host_vm, sigterm_as_exit, use_host_threads
from ohq_tvm.oqa.quiet import QuietGate
from ohq_tvm.pipeline import compile_model
from ohq_tvm.targets import resolve_target

from timing import SETTLE_S, BenchmarkRun, interleaved, ort_timer, parse_args, tvm_timer

WARMUP_RUNS, BLOCKS, BLOCK_RUNS = 5, 6, 5  # profiled runs: BLOCKS x BLOCK_RUNS
CONVS = ("stem conv", "depthwise conv", "expansion 1x1", "projection 1x1", "other conv")
CLASSES = (*CONVS, "dense/matmul", "quantize/dequantize/requantize", "elementwise/other", "runtime builtin")
KIND_CLASS = {"conv": "other conv", "dense": "dense/matmul", "quantize": CLASSES[6], "other": CLASSES[7]}
ORT_ENGINES = ("ort fp32", "ort int8 u8s8 qdq", "ort int8 s8s8 qdq")
ENGINES = ("ohq-tvm int8", "ohq-tvm fp32", *ORT_ENGINES)
ORT_KINDS = {"Conv": "conv", "QLinearConv": "conv", "FusedConv": "conv", "NhwcFusedConv": "conv"}
ORT_KINDS |= dict.fromkeys(
    ("Gemm", "QGemm", "MatMul", "QLinearMatMul", "MatMulInteger", "FusedMatMul"), "dense"
)
ORT_KINDS |= dict.fromkeys(("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"), "quantize")
INTEGER = ("int8", "uint8", "int16")
OVERHEAD_COLUMNS = (
    "whole_ms",
    "plain_run_ms",
    "profiled_run_ms",
    "kernel_sum_ms",
    "kernel_sum_median_run_ms",
)
OVERHEAD_COLUMNS += ("outside_kernels_ms", "plain_minus_kernels_ms")


@dataclass
class Call:
    """One call of a run (a TVM function or an ORT node, in run order) and its µs in each profiled run."""

    name: str
    layer_class: str
    shapes: list[str]  # TVM: each tensor argument's shape and dtype; ORT: the op and its input shapes
    output: list[int]
    weight: list[int] | None
    macs: int | None
    int8: bool  # int8 arithmetic (ohq-tvm's int8 depthwise conv computes in float32: False)
    times_us: list[float] = field(default_factory=list)


def dims(shape: list[int]) -> str:
    return "x".join(map(str, shape))


def classify(
    name: str, kind: str, shapes: list, output: list, weight: list | None, int8: bool, kernel=None, depth=0
) -> Call:
    """A call of ``kind`` ("conv", "dense", "quantize", "other") classed, its MACs counted: a conv's from its
    ``kernel`` (out channels, in channels per group, taps KH·KW: an OIHW weight's, whatever the weight's
    layout; prod(output) = N·O·OH·OW in any layout), a dense's from its reduction ``depth``."""
    if kind == "conv" and kernel:
        out_channels, in_per_group, taps = kernel
        if taps > 1:
            layer_class = {1: "depthwise conv", 3: "stem conv"}.get(in_per_group, "other conv")
        elif out_channels != in_per_group:
            layer_class = "expansion 1x1" if out_channels > in_per_group else "projection 1x1"
        else:
            layer_class = "other conv"
        return Call(name, layer_class, shapes, output, weight, math.prod(output) * in_per_group * taps, int8)
    if kind == "dense" and depth:
        return Call(name, "dense/matmul", shapes, output, weight, math.prod(output) * depth, int8)
    return Call(name, KIND_CLASS[kind], shapes, output, weight, None, False)


def tvm_call(symbol: str, args: tuple) -> Call:
    """A VM call classed by its symbol, its MACs from its tensor arguments (destination-passing: the output
    last, NCHW). A conv's data is its first NCHW activation not shaped like the output (a residual is), its
    weight the largest other tensor of rank 4 or more: OIHW, or packed with KH, KW still at dims 2 and 3
    (OIHW8o2i: uint8 data times int8 weights widened to int16)."""
    if symbol.startswith("vm.builtin."):
        return Call(symbol, "runtime builtin", [], [], None, None, False)
    tensors = [([int(d) for d in a.shape], str(a.dtype)) for a in args if hasattr(a, "shape")]
    shapes = [f"{dims(s)} {d}" for s, d in tensors]
    output = tensors[-1][0] if tensors else []
    if "conv2d" in symbol and len(output) == 4:
        activations = [t for t in tensors[:-1] if len(t[0]) == 4 and t[0][0] == output[0] and t[0][2] > 1]
        weights = [t for t in tensors[:-1] if len(t[0]) >= 4 and t not in activations]
        if not activations or not weights:
            return classify(symbol, "conv", shapes, output, None, False)
        (data, data_dtype), *_ = sorted(activations, key=lambda t: t[0] == output)
        weight, dtype = max(weights, key=lambda t: math.prod(t[0]))
        taps = weight[2] * weight[3]
        in_per_group = min(data[1], round(math.prod(weight) / output[1] / taps))  # a packed weight pads
        int8 = data_dtype in INTEGER and dtype in INTEGER
        return classify(symbol, "conv", shapes, output, weight, int8, (output[1], in_per_group, taps))
    if "matmul" in symbol or "dense" in symbol:
        data = [(s, d) for s, d in tensors[:-1] if len(s) >= 2 and s[:-1] == output[:-1]]
        (data_shape, dtype), *_ = data or [([0], "")]
        return classify(symbol, "dense", shapes, output, None, dtype in INTEGER, depth=data_shape[-1])
    kind = "quantize" if "quantize" in symbol or ("cast" in symbol and "round" in symbol) else "other"
    return classify(symbol, kind, shapes, output, None, False)


def alternate(plain: Callable[[], object], profiled: Callable[[], object]) -> tuple[list[float], list[float]]:
    """Wall ms of the plain and the profiled runs, after warm-up, in blocks taking turns, each block
    :data:`SETTLE_S` after the other's (ONNX Runtime's idle threads spin: see timing.SETTLE_S)."""
    for run in (plain, profiled):
        for _ in range(WARMUP_RUNS):
            run()
    walls: tuple[list[float], list[float]] = ([], [])
    for _ in range(BLOCKS):
        for run, wall in zip((plain, profiled), walls, strict=True):
            time.sleep(SETTLE_S)
            for _ in range(BLOCK_RUNS):
                started = time.perf_counter()
                run()
                wall.append((time.perf_counter() - started) * 1e3)
    return walls


def profile_tvm(library_path: Path, x: np.ndarray) -> tuple[list[Call], list[float], list[float]]:
    """Every call of ``main`` timed through the VM's instrument hook, and the plain and instrumented runs'
    wall ms. Raises ``RuntimeError`` if the runs make different numbers of calls."""
    library = tvm.runtime.load_module(str(library_path))
    plain, instrumented = host_vm(library), host_vm(library)
    data = tvm.runtime.tensor(x)
    calls: list[Call] = []
    elapsed_s: list[float] = []
    started_s = [0.0]

    def describe(func, symbol, before, ret, *args) -> int:
        if before:
            calls.append(tvm_call(symbol, args))
        return 0

    def time_call(func, symbol, before, ret, *args) -> int:
        now = time.perf_counter()
        if before:
            started_s[0] = now
        else:
            elapsed_s.append(now - started_s[0])
        return 0

    instrumented.set_instrument(describe)
    instrumented["main"](data)
    instrumented.set_instrument(time_call)
    walls = alternate(lambda: plain["main"](data), lambda: instrumented["main"](data))
    runs = BLOCKS * BLOCK_RUNS
    if len(elapsed_s) != (WARMUP_RUNS + runs) * len(calls):
        raise RuntimeError(f"{library_path}: {len(elapsed_s)} calls timed, not {len(calls)} per run")
    times_us = np.array(elapsed_s[-runs * len(calls) :]).reshape(runs, len(calls)) * 1e6
    for call, column in zip(calls, times_us.T, strict=True):
        call.times_us = column.tolist()
    return calls, *walls


def ort_session(path: Path, threads: int, **options) -> ort.InferenceSession:
    settings = ort.SessionOptions()
    settings.intra_op_num_threads = threads
    settings.log_severity_level = 3  # not its warning that a saved NCHWc graph suits this machine only
    for key, value in options.items():
        setattr(settings, key, value)
    return ort.InferenceSession(str(path), settings, providers=["CPUExecutionProvider"])


def profile_ort(path: Path, x: np.ndarray, threads: int, scratch: Path) -> tuple[list[Call], list, list]:
    """Every node's ``_kernel_time`` from ONNX Runtime's profiler, the plain and profiled runs' wall ms."""
    optimized = scratch / f"{path.stem}-optimized.onnx"
    ort_session(path, threads, optimized_model_filepath=str(optimized))
    graph = onnx.load(str(optimized)).graph
    constant = {i.name: list(i.dims) for i in graph.initializer}
    # a weight ORT did not fold into a QLinearConv (s8s8 on x86) reaches its fp32 Conv dequantized each run
    constant |= {
        n.output[0]: constant[n.input[0]]
        for n in graph.node
        if n.op_type == "DequantizeLinear" and n.input[0] in constant
    }
    weights = {
        n.name: next((constant[i] for i in n.input if len(constant.get(i, [])) == 4), None)
        for n in graph.node
    }
    plain = ort_session(path, threads)
    profiled = ort_session(path, threads, enable_profiling=True, profile_file_prefix=str(scratch / path.stem))
    walls = alternate(lambda: plain.run(None, {"input": x}), lambda: profiled.run(None, {"input": x}))
    trace = json.loads(Path(profiled.end_profiling()).read_text())
    model_runs = [e["ts"] for e in trace if e.get("cat") == "Session" and e["name"] == "model_run"]
    first_timed = model_runs[-BLOCKS * BLOCK_RUNS]
    kernels = [e for e in trace if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    calls: dict[str, Call] = {}
    for event in (e for e in kernels if e["ts"] >= first_timed):
        name, args = event["name"].removesuffix("_kernel_time"), event["args"]
        if name not in calls:
            op = args["op_name"]
            inputs = [next(iter(s.values()), None) for s in args.get("input_type_shape", [])]
            output = next(iter(args["output_type_shape"][0].values()))
            int8 = op.startswith("QLinear") or op == "QGemm" or op.endswith("Integer")
            kind = ORT_KINDS.get(op, "other")
            depth = inputs[0][-1] if kind == "dense" and inputs and inputs[0] else 0
            shapes = [op, *(dims(i) for i in inputs if i is not None)]
            weight = weights.get(name)
            kernel = (weight[0], weight[1], weight[2] * weight[3]) if weight else None
            calls[name] = classify(name, kind, shapes, output, weight, int8, kernel, depth)
        calls[name].times_us.append(float(event["dur"]))
    if any(len(c.times_us) != BLOCKS * BLOCK_RUNS for c in calls.values()):
        raise RuntimeError(f"{path}: a node did not run once in each profiled run")
    return list(calls.values()), *walls


def peak(threads: int) -> dict:
    """Peak MACs of ``threads`` cores at the clock /proc/cpuinfo reports (a documented assumption, x86 only):
    fp32 2 FMA pipes × lanes (8 with AVX2, 16 with AVX-512F); int8 2 pipes × 4·lanes with VNNI (one vpdpbusd
    per 4·lanes MACs), half that without (vpmaddubsw then vpmaddwd: two multiplier µops per 4·lanes MACs)."""
    info: dict[str, str] = {}
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            key, _, value = (part.strip() for part in line.partition(":"))
            info.setdefault(key, value)
    flags, mhz = set(info.get("flags", "").split()), float(info.get("cpu MHz", "nan"))
    simd = sorted(flags & {"avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni"})
    record = {"reported_clock_mhz": mhz, "cores": threads, "simd_flags": simd}
    if not {"avx2", "fma"} <= flags or math.isnan(mhz):
        return (
            record | dict.fromkeys(("fp32_gmacs", "int8_gmacs")) | {"formula": "none: no AVX2 + FMA or clock"}
        )
    lanes, vnni = 16 if "avx512f" in flags else 8, bool(flags & {"avx512_vnni", "avx_vnni"})
    fp32, int8 = 2 * lanes, 2 * 4 * lanes // (1 if vnni else 2)
    return record | {
        "fp32_macs_per_cycle_core": fp32,
        "int8_macs_per_cycle_core": int8,
        "fp32_gmacs": fp32 * threads * mhz / 1e3,
        "int8_gmacs": int8 * threads * mhz / 1e3,
        "formula": f"fp32 2 FMA pipes x {lanes} lanes = {fp32} MAC/cycle/core, int8 2 pipes x {4 * lanes} "
        f"{'(VNNI)' if vnni else '/ 2 (no VNNI: vpmaddubsw + vpmaddwd)'} = {int8} MAC/cycle/core; "
        f"x {threads} cores x {mhz:.0f} MHz (the clock /proc/cpuinfo reports)",
    }


def summary(calls: list[Call], plain_ms: list, profiled_ms: list, whole: tuple, peaks: dict) -> dict:
    """One engine: per-call rows, per-class sums, the whole-model times and the time outside kernels."""
    rows = []
    for call in calls:
        median_us = statistics.median(call.times_us)
        gmacs = call.macs / median_us / 1e3 if call.macs else None
        top = peaks["int8_gmacs" if call.int8 else "fp32_gmacs"]
        row = asdict(call) | {"median_us": median_us, "min_us": min(call.times_us), "gmacs": gmacs}
        row |= {"max_us": max(call.times_us), "percent_of_peak": 100 * gmacs / top if gmacs and top else None}
        del row["times_us"]  # the raw numbers kept: min / max here, the per-run sums below
        rows.append(row)
    builtins: dict[str, dict] = {}  # per symbol: alloc_tensor, alloc_storage, check_tensor_info, ...
    for row in (r for r in rows if r["layer_class"] == "runtime builtin"):
        entry = builtins.setdefault(row["name"], {"calls": 0, "ms": 0.0})
        entry["calls"], entry["ms"] = entry["calls"] + 1, entry["ms"] + row["median_us"] / 1e3
    classes = {}
    for name in CLASSES:
        members = [r for r in rows if r["layer_class"] == name]
        ms, macs = sum(r["median_us"] for r in members) / 1e3, sum(r["macs"] or 0 for r in members)
        gmacs = macs / ms / 1e6 if macs else None
        classes[name] = {"ms": ms, "calls": len(members), "macs": macs, "gmacs": gmacs}
    kernels_per_run = np.sum([c.times_us for c in calls if c.layer_class != "runtime builtin"], axis=0) / 1e3
    kernel_ms = sum(c["ms"] for n, c in classes.items() if n != "runtime builtin")
    plain = statistics.median(plain_ms)
    return {
        "whole_ms": whole[0],
        "whole_raw_ms": whole[1],
        "plain_run_ms": plain,
        "profiled_run_ms": statistics.median(profiled_ms),
        "kernel_sum_ms": kernel_ms,  # of the per-call medians; far from the next one on a noisy machine
        "kernel_sum_median_run_ms": float(np.median(kernels_per_run)),
        # each profiled run minus its own kernels: robust to drift, but with the hook's / profiler's cost
        "outside_kernels_ms": float(np.median(np.array(profiled_ms) - kernels_per_run)),
        "plain_minus_kernels_ms": plain - kernel_ms,
        "builtin_sum_ms": classes["runtime builtin"]["ms"],
        "builtin_calls": classes["runtime builtin"]["calls"],
        "plain_runs_ms": plain_ms,
        "profiled_runs_ms": profiled_ms,
        "kernel_sum_per_run_ms": kernels_per_run.tolist(),
        "classes": classes,
        "builtins": builtins,
        "calls": [r for r in rows if r["layer_class"] != "runtime builtin"],
    }


def bench(name: str, scratch: Path, repeats: int, threads: int, gate: QuietGate, peaks: dict, say) -> dict:
    started = time.perf_counter()
    folder = scratch / name
    model = real_model(MODELS[name], folder)
    photos, fp32_onnx, with_bn = model.photos, model.fp32_onnx, model.with_bn
    paths = {e: p for e, p in ort_models(fp32_onnx, photos.calibration, folder).items() if e in ORT_ENGINES}
    # As `ohq-tvm compile` builds them (peers.py checks their agreement with ONNX Runtime)
    int8 = {"precision": "int8", "calibration_samples": photos.calibration_dir}
    ours = {
        engine: compile_model(Path(with_bn), "host", folder / engine, verify=False, **options).library_path
        for engine, options in (("ohq-tvm int8", int8), ("ohq-tvm fp32", {}))
    }
    say(f"[{name}] built in {time.perf_counter() - started:.0f} s; whole-model timing, {repeats} rounds")
    x = photos.views[0]
    timers = {e: tvm_timer(tvm.runtime.load_module(str(p)), [tvm.runtime.tensor(x)]) for e, p in ours.items()}
    timers |= {e: ort_timer(onnx.load(str(p)), {"input": x}, threads) for e, p in paths.items()}
    medians, raw = interleaved(timers, repeats, gate)
    engines = {}
    for engine in ENGINES:
        say(f"[{name}] profiling {engine}")
        if engine in ours:
            profile = profile_tvm(ours[engine], x)
        else:
            profile = profile_ort(paths[engine], x, threads, folder)
        engines[engine] = summary(*profile, (medians[engine], raw[engine]), peaks)
    return {"model": name, "engines": engines, "seconds": round(time.perf_counter() - started, 1)}


def cell(layer: dict) -> str:
    return f"{layer['ms']:.2f} ({layer['gmacs']:.1f})" if layer["gmacs"] else f"{layer['ms']:.2f}"


def ratio(ours_ms: float, theirs_ms: float) -> str:
    return f"{ours_ms / theirs_ms:.2f}x" if ours_ms and theirs_ms else "—"


def markdown(record: dict) -> list[str]:
    settings, machine, peaks = record["settings"], record["machine"], record["peak"]
    load = settings["load_average_1_5_15_min"]
    lines = [
        "# Where the time goes: ohq-tvm's layers against ONNX Runtime's",
        "",
        f"Machine: {machine['cpu_model'].get('model name', '?')} ({machine['cpu']}), every engine on "
        f"{settings['threads']} threads; TVM {tvm.__version__}, ONNX Runtime {ort.__version__}; load "
        f"average {load['start'][0]:.2f} at the start, {load['end'][0]:.2f} at the end. Per-call times: "
        "ohq-tvm's from the Relax VM's instrument hook (perf_counter around each call), ONNX Runtime's from "
        f"its profiler (node `_kernel_time`), which adds its own overhead; medians of "
        f"{settings['profiled_runs']} runs. Whole model: median of {settings['repeats']} interleaved rounds, "
        f"uninstrumented. Cells: ms (GMAC/s). Peak, an assumption and not a measurement: {peaks['formula']}: "
        f"{peaks['fp32_gmacs'] or 0:.1f} GMAC/s fp32, {peaks['int8_gmacs'] or 0:.1f} GMAC/s int8; a call's % "
        "of peak is of its arithmetic's (ohq-tvm's int8 depthwise conv computes in float32: fp32 peak).",
    ]
    pairs = ("ohq-tvm int8", "ort int8 u8s8 qdq", "ohq-tvm fp32", "ort fp32")
    for row in record["models"]:
        e = row["engines"]
        lines += [
            "",
            f"## {row['model']}",
            "",
            "| class | GMAC | ohq-tvm int8 | ort u8s8 qdq | ratio | ohq-tvm fp32 | ort fp32 | ratio |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for name in CLASSES:
            a, b, c, d = (e[engine]["classes"][name] for engine in pairs)
            if a["calls"] or b["calls"] or c["calls"] or d["calls"]:
                gmac = max(a["macs"], b["macs"], c["macs"], d["macs"]) / 1e9
                ratios = ratio(a["ms"], b["ms"]), ratio(c["ms"], d["ms"])
                cells = f"{cell(a)} | {cell(b)} | {ratios[0]} | {cell(c)} | {cell(d)} | {ratios[1]}"
                lines.append(f"| {name} | {gmac:.3f} | {cells} |")
        a, b, c, d = (e[engine]["kernel_sum_ms"] for engine in pairs)
        lines.append(
            f"| sum of kernels | | {a:.2f} | {b:.2f} | {ratio(a, b)} | {c:.2f} | {d:.2f} | {ratio(c, d)} |"
        )
        lines += [
            "",
            "Whole model and overhead, ms: interleaved rounds; plain and profiled (instrumented) runs taking "
            "turns; kernels (sum of per-call medians, and the median run's sum); outside kernels in the same "
            "profiled runs (with the hook's or profiler's cost), and plain run minus kernels:",
            "",
            "| engine | whole | plain | profiled | kernels | median run's | outside, same run "
            "| plain - kernels | vm.builtin calls |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for engine in ENGINES:
            s = e[engine]
            times = " | ".join(f"{s[k]:.2f}" for k in OVERHEAD_COLUMNS)
            builtins = f"{s['builtin_calls']}: {s['builtin_sum_ms']:.2f}" if s["builtin_calls"] else "—"
            lines.append(f"| {engine} | {times} | {builtins} |")
        lines += [
            "",
            "ohq-tvm int8's 10 slowest calls:",
            "",
            "| call | class | weight → output | µs | GMAC/s | % of peak |",
            "| --- | --- | --- | ---: | ---: | ---: |",
        ]
        for r in sorted(e["ohq-tvm int8"]["calls"], key=lambda r: -r["median_us"])[:10]:
            shape = (f"{dims(r['weight'])} → " if r["weight"] else "") + dims(r["output"])
            gmacs = f"{r['gmacs']:.1f} | {r['percent_of_peak']:.0f}%" if r["gmacs"] else "— | —"
            lines.append(f"| `{r['name']}` | {r['layer_class']} | {shape} | {r['median_us']:.0f} | {gmacs} |")
    return lines


def main() -> None:
    args = parse_args(
        __doc__, repeats=7, extra={"--models": "mobilenet_v2,efficientnet_lite0", "--quiet-wait": "3"}
    )
    # The canary wait per whole-model timing: 3 s as peers.py takes on the Zen 3 host, whose canary never
    # settles within 1.25x (timing.GATE's 30 s would make every timing wait it out).
    gate = QuietGate(max_wait_s=float(args.quiet_wait))
    threads = use_host_threads()
    torch.set_num_threads(threads)
    peaks = peak(threads)
    run = BenchmarkRun("layers", resolve_target("host").tvm_target(), gate)
    with tempfile.TemporaryDirectory(prefix="ohq-layers-") as scratch:
        models = [n for n in args.models.split(",") if n]
        rows = [bench(n, Path(scratch), args.repeats, threads, gate, peaks, run.say) for n in models]
    settings = {
        "repeats": args.repeats,
        "profiled_runs": BLOCKS * BLOCK_RUNS,
        "warmup_runs": WARMUP_RUNS,
        "threads": threads,
        "torch": torch.__version__,
        "ohq_tvm": "default schedule, no tuning; int8: every layer, minmax on the held-out crops",
        "ort": "per-channel int8 weights, minmax, after quant_pre_process (peer_engines.ort_models)",
    }
    run.write(args.out, settings, markdown, peak=peaks, models=rows)


if __name__ == "__main__":
    with sigterm_as_exit():  # a killed run still takes its loopback boards down
        main()
