"""Peers: the runtimes a user could deploy instead of ohq-tvm, against its fp32 and uniform int8, in one run.

Usage: python benchmarks/peers.py [--models mobilenet_v2,efficientnet_lite0] [--repeats 15] [--out ...]
(needs `make peers`: torch, LiteRT, its converter and quantizer, the pretrained weights and the photos)

Per model (real ImageNet weights), every engine built in this run from the same torch model and calibrated
on the same 25 held-out crops, all on the same threads (every physical core: TVM's default here):

- ``litert fp32``: LiteRT with XNNPACK (on by default) on the model converted by litert-torch (NHWC input);
- ``litert int8``: every op int8 (ai-edge-quantizer ``static_wi8_ai8``, calibrated with true min/max: its
  default moving average of batch ranges clips them); its input and output are int8 too, quantized and
  dequantized outside the timed call (ONNX Runtime's QDQ models take float input and quantize inside);
- ``ort fp32``; ``ort int8 u8s8 qdq`` / ``ort int8 u8s8 qoperator``: ``quantize_static`` with uint8
  activations (the form x86's u8·s8 instructions take), per-channel int8 weights, minmax, after
  ``quant_pre_process``; ``ort int8 s8s8 qdq``: int8 activations, ORT's default and its slow path on x86;
- ``ohq-tvm fp32`` and ``ohq-tvm int8`` (every layer int8, the default schedule, no tuning), as
  ``ohq-tvm compile`` builds them.

Latency: every engine timed in the same interleaved rounds (each timing averages runs over at least 100 ms,
starts after the other runtimes' threads went quiet, and is gated on the quiet canary of
``ohq_tvm.oqa.quiet``). Accuracy: top-1 agreement with ``ort fp32`` over 120 views of 24 photos.

Writes results/peers.json (machine, versions, settings, raw numbers) and results/peers.md: per model, the
fastest peer in int8 and in fp32, and ohq-tvm's ratio to each.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pretrained
import torch
import tvm
from accuracy import MODELS
from accuracy_report import cpu_facts, metrics
from onnxruntime.quantization import (
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quant_pre_process,
    quantize_static,
)
from ort_static import InputBatches
from photos import SKIMAGE_CALIBRATION, photo_set

from ohq_tvm.board import host_vm, sigterm_as_exit, use_host_threads
from ohq_tvm.oqa.quiet import QuietGate
from ohq_tvm.pipeline import compile_model
from ohq_tvm.targets import resolve_target

from timing import interleaved, machine_record, ort_timer, parse_args, tvm_timer, write_results

ORT_INT8 = {
    "ort int8 u8s8 qdq": (QuantFormat.QDQ, QuantType.QUInt8),
    "ort int8 u8s8 qoperator": (QuantFormat.QOperator, QuantType.QUInt8),
    "ort int8 s8s8 qdq": (QuantFormat.QDQ, QuantType.QInt8),
}
PEER_INT8 = ("litert int8", *ORT_INT8)
PEER_FP32 = ("litert fp32", "ort fp32")
OURS = ("ohq-tvm fp32", "ohq-tvm int8")
Runner = Callable[[np.ndarray], np.ndarray]  # [1, 3, 224, 224] float32 -> logits


class LiteRT:
    """A LiteRT interpreter (XNNPACK) on a ``.tflite`` with one NHWC input; int8 I/O handled outside."""

    def __init__(self, path: Path, threads: int) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self.interpreter = Interpreter(model_path=str(path), num_threads=threads)
        self.interpreter.allocate_tensors()
        self.input = self.interpreter.get_input_details()[0]
        self.output = self.interpreter.get_output_details()[0]

    def feed(self, x_nchw: np.ndarray) -> np.ndarray:
        """The model's input for an NCHW float batch: NHWC, quantized when the model takes integers."""
        x = np.ascontiguousarray(x_nchw.transpose(0, 2, 3, 1))
        if self.input["dtype"] == np.float32:
            return x
        scale, zero_point = self.input["quantization"]
        limits = np.iinfo(self.input["dtype"])
        return np.clip(np.round(x / scale) + zero_point, limits.min, limits.max).astype(self.input["dtype"])

    def invoke(self, fed: np.ndarray) -> np.ndarray:
        self.interpreter.set_tensor(self.input["index"], fed)
        self.interpreter.invoke()
        return self.interpreter.get_tensor(self.output["index"])

    def __call__(self, x_nchw: np.ndarray) -> np.ndarray:
        y = self.invoke(self.feed(x_nchw))
        if self.output["dtype"] == np.float32:
            return y
        scale, zero_point = self.output["quantization"]
        return (y.astype(np.float32) - zero_point) * scale

    def timer(self, x_nchw: np.ndarray) -> Callable[[], float]:
        """Milliseconds per run (set input, invoke, read output), averaged over at least 100 ms."""
        fed = self.feed(x_nchw)
        self.invoke(fed)

        def run() -> float:
            count, started = 0, time.perf_counter()
            while True:
                self.invoke(fed)
                count += 1
                elapsed = time.perf_counter() - started
                if elapsed >= 0.1:
                    return elapsed / count * 1e3

        return run


def litert_models(model: torch.nn.Module, calibration: list[np.ndarray], scratch: Path) -> dict[str, Path]:
    """``litert fp32`` converted by litert-torch (NHWC input) and ``litert int8`` quantized from it."""
    import litert_torch
    from ai_edge_quantizer import calibrator, quantizer, recipe
    from ai_edge_quantizer.utils import qsv_utils

    fp32, int8 = scratch / "litert-fp32.tflite", scratch / "litert-int8.tflite"
    nhwc = litert_torch.to_channel_last_io(model, args=[0]).eval()
    litert_torch.convert(nhwc, (torch.zeros(1, 224, 224, 3),)).export(str(fp32))
    quant = quantizer.Quantizer(str(fp32), recipe.static_wi8_ai8())
    # Quantizer.calibrate() keeps a moving average of each batch's range, which clips the ranges (top-1
    # agreement fell to 74/120 on MobileNetV2): the true min/max over all crops instead.
    ranges = calibrator.Calibrator(str(fp32), qsv_update_func=qsv_utils.min_max_update)
    feeds = [{"args_0": np.ascontiguousarray(x.transpose(0, 2, 3, 1))} for x in calibration]
    ranges.calibrate({"serving_default": feeds}, quant._recipe_manager)
    quant.quantize(ranges.get_model_qsvs()).export_model(str(int8), overwrite=True)
    return {"litert fp32": fp32, "litert int8": int8}


def ort_models(fp32: Path, calibration: list[np.ndarray], scratch: Path) -> dict[str, Path]:
    """``ort fp32`` and the three int8 forms of :data:`ORT_INT8`, per-channel weights, minmax."""
    prepared = scratch / "ort-prepared.onnx"
    quant_pre_process(str(fp32), str(prepared))
    paths = {"ort fp32": fp32}
    for engine, (form, activations) in ORT_INT8.items():
        paths[engine] = scratch / f"{engine.replace(' ', '-')}.onnx"
        quantize_static(
            str(prepared),
            str(paths[engine]),
            InputBatches(calibration),
            quant_format=form,
            activation_type=activations,
            weight_type=QuantType.QInt8,
            per_channel=True,
            calibrate_method=CalibrationMethod.MinMax,
        )
    return paths


def ort_runner(path: Path, threads: int) -> Runner:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"input": x})[0]


def bench(name: str, scratch: Path, repeats: int, threads: int, gate: QuietGate, say) -> dict:
    started = time.perf_counter()
    load, preprocessing = MODELS[name]
    model = load().eval()
    folder = scratch / name
    folder.mkdir()
    fp32_onnx = Path(pretrained.export_onnx(model, (1, 3, 224, 224), str(folder / "fp32.onnx")))
    with_bn = Path(
        pretrained.export_onnx(model, (1, 3, 224, 224), str(folder / "bn.onnx"), keep_batchnorm=True)
    )
    photos = photo_set(preprocessing, folder / "calibration")
    calibration = photos.calibration
    paths = {**litert_models(model, calibration, folder), **ort_models(fp32_onnx, calibration, folder)}
    say(f"[{name}] peers built in {time.perf_counter() - started:.0f} s")
    # Built as `ohq-tvm compile` builds them; checked against ONNX Runtime by the tests and the headline
    # (here: their top-1 agreement below).
    ours = {
        "ohq-tvm fp32": compile_model(with_bn, "host", folder / "tvm-fp32", verify=False),
        "ohq-tvm int8": compile_model(
            with_bn,
            "host",
            folder / "tvm-int8",
            precision="int8",
            calibration_samples=photos.calibration_dir,
            verify=False,
        ),
    }
    x = photos.views[0]
    runners: dict[str, Runner] = {}
    timers = {}
    for engine, path in paths.items():
        if engine.startswith("litert"):
            runners[engine] = LiteRT(path, threads)
            timers[engine] = runners[engine].timer(x)
        else:
            runners[engine] = ort_runner(path, threads)
            timers[engine] = ort_timer(onnx.load(str(path)), {"input": x}, threads)
    for engine, result in ours.items():
        vm = host_vm(tvm.runtime.load_module(str(result.library_path)))
        runners[engine] = lambda v, vm=vm: vm["main"](tvm.runtime.tensor(v)).numpy()
        timers[engine] = tvm_timer(tvm.runtime.load_module(str(result.library_path)), [tvm.runtime.tensor(x)])
    say(f"[{name}] timing {len(timers)} engines, {repeats} interleaved rounds")
    medians, raw = interleaved(timers, repeats, gate)
    logits = {engine: np.concatenate([run(v) for v in photos.views]) for engine, run in runners.items()}
    accuracy = {engine: metrics(logits[engine], logits["ort fp32"], photos.labelled) for engine in runners}
    return {
        "model": name,
        "views": len(photos.views),
        "median_ms": medians,
        "raw_ms": raw,
        "accuracy": {
            engine: {k: v for k, v in a.items() if k not in ("top1_per_view", "kl_per_view")}
            for engine, a in accuracy.items()
        },
        "seconds": round(time.perf_counter() - started, 1),
    }


def fastest(medians: dict[str, float], engines: tuple[str, ...]) -> str:
    return min(engines, key=medians.__getitem__)


def markdown(record: dict) -> list[str]:
    settings, machine = record["settings"], record["machine"]
    cpu, gate = machine["cpu_model"], settings["quiet_gate"]
    load = settings["load_average_1_5_15_min"]
    lines = [
        "# ohq-tvm against the runtimes a user could deploy instead",
        "",
        f"Machine: {cpu.get('model name', '?')} ({machine['cpu']}; int8 dot product: "
        f"{', '.join(cpu.get('int8_dot_product', [])) or 'none'}), {machine['cores']} cores, every engine on "
        f"{settings['threads']} threads; TVM {tvm.__version__}, ONNX Runtime {ort.__version__}, "
        f"LiteRT {settings['litert']}. Median of {settings['repeats']} interleaved rounds (each timing "
        f"averages runs over at least 100 ms, after waiting up to {gate['max_wait_s']:.0f} s for the "
        f"canary at its usual speed: {gate['timings_that_waited']} timings waited, {gate['waited_s']:.0f} s "
        "in all); load average "
        f"{load['start'][0]:.2f} at the start, {load['end'][0]:.2f} at the end. Top-1 agreement with ORT "
        "fp32 over the same views.",
        "",
        "| model | engine | latency ms | vs fastest peer int8 | top-1 agreement with fp32 |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for row in record["models"]:
        m = row["median_ms"]
        best = m[fastest(m, PEER_INT8)]
        for engine in sorted(m, key=m.__getitem__):
            acc = row["accuracy"][engine]
            lines.append(
                f"| {row['model']} | {engine} | {m[engine]:.2f} | {m[engine] / best:.2f}x | "
                f"{acc['top1_agreeing_views']}/{row['views']} |"
            )
    lines += ["", "Fastest engines, and ohq-tvm against them (targets of issue #25):", ""]
    for row in record["models"]:
        m = row["median_ms"]
        peer_int8, peer_fp32 = fastest(m, PEER_INT8), fastest(m, PEER_FP32)
        overall = min(m, key=m.__getitem__)
        int8_ratio = m["ohq-tvm int8"] / m[peer_int8]
        fp32_ratio = m["ohq-tvm fp32"] / m[peer_fp32]
        lines.append(
            f"- {row['model']}: fastest engine {overall} ({m[overall]:.2f} ms); fastest peer int8 "
            f"{peer_int8} ({m[peer_int8]:.2f} ms): ohq-tvm int8 {int8_ratio:.2f}x it (target ≤ 1.0: "
            f"{'met' if int8_ratio <= 1.0 else 'not met'}); fastest peer fp32 {peer_fp32} "
            f"({m[peer_fp32]:.2f} ms): ohq-tvm fp32 {fp32_ratio:.2f}x it (target ≤ 1.2: "
            f"{'met' if fp32_ratio <= 1.2 else 'not met'})"
        )
    return lines


def main() -> None:
    from importlib.metadata import version

    args = parse_args(
        __doc__, repeats=15, extra={"--models": "mobilenet_v2,efficientnet_lite0", "--quiet-wait": "30"}
    )
    # How long a timing waits for the canary at its usual speed (timing.GATE's 30 s suits a host with slow
    # spells; on a host whose canary is always noisy every timing would wait it out).
    gate = QuietGate(max_wait_s=float(args.quiet_wait))
    threads = use_host_threads()  # TVM's threads in this process; the peers get the same
    torch.set_num_threads(threads)
    target = resolve_target("host").tvm_target()
    started = time.perf_counter()
    load_before = os.getloadavg()

    def say(message: str) -> None:
        print(f"  [{time.perf_counter() - started:6.0f}s] {message}", flush=True)

    with tempfile.TemporaryDirectory(prefix="ohq-peers-") as scratch:
        rows = [
            bench(n, Path(scratch), args.repeats, threads, gate, say) for n in args.models.split(",") if n
        ]
    record = {
        "benchmark": "peers",
        **machine_record(target),
        "settings": {
            "repeats": args.repeats,
            "threads": threads,
            "quiet_gate": gate.to_json() | {"max_wait_s": gate.max_wait_s},
            "litert": version("ai-edge-litert"),
            "litert_torch": version("litert-torch"),
            "ai_edge_quantizer": version("ai-edge-quantizer"),
            "torch": torch.__version__,
            "calibration": f"held-out photos {list(SKIMAGE_CALIBRATION)} (5 views each), minmax",
            "ohq_tvm": "default schedule, no tuning; int8: every layer, calibrated minmax on the same crops",
            "wall_s": round(time.perf_counter() - started, 1),
            "load_average_1_5_15_min": {"start": load_before, "end": os.getloadavg()},
        },
        "models": rows,
    }
    record["machine"]["cpu_model"] = cpu_facts()
    write_results(args.out, "peers", record, markdown(record))


if __name__ == "__main__":
    with sigterm_as_exit():  # a killed run still takes its loopback boards down
        main()
