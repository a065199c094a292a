"""The engines every speed benchmark times: the peers a user could deploy instead of ohq-tvm, and ohq-tvm.

One place builds them for ``peers.py``, ``headline.py`` and ``kernels.py`` (its whole models), from the
torch model (real weights, ``pretrained.py``), its ONNX export and the held-out calibration crops:

- ``litert fp32``: LiteRT with XNNPACK (on by default) on the model converted by litert-torch (NHWC input);
- ``litert int8``: every op int8 (ai-edge-quantizer ``static_wi8_ai8``, calibrated with true min/max: its
  default moving average of batch ranges clips them); its input and output are int8 too, quantized and
  dequantized outside the timed call (ONNX Runtime's QDQ models take float input and quantize inside);
- ``ort fp32``; ``ort int8 u8s8 qdq`` / ``ort int8 u8s8 qoperator``: ``quantize_static`` with uint8
  activations (the form x86's u8·s8 instructions take), per-channel int8 weights, minmax, after
  ``quant_pre_process``; ``ort int8 s8s8 qdq``: int8 activations, ORT's default and its slow path on x86.

Each :class:`Engine` runs an NCHW float batch to logits and times itself (milliseconds per run, averaged
over at least 100 ms) for ``timing.interleaved``. :func:`target_lines` states, per model, the fastest
engine and ohq-tvm's ratios to the fastest peer int8 and fp32 against the targets of issue #25.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pretrained
import tvm
from onnxruntime.quantization import (
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quant_pre_process,
    quantize_static,
)
from ort_static import InputBatches
from photos import SKIMAGE_CALIBRATION, PhotoSet, Preprocessing, photo_set

from ohq_tvm.board import host_vm

from timing import Timer, ort_timer, tvm_timer

ORT_INT8 = {
    "ort int8 u8s8 qdq": (QuantFormat.QDQ, QuantType.QUInt8),
    "ort int8 u8s8 qoperator": (QuantFormat.QOperator, QuantType.QUInt8),
    "ort int8 s8s8 qdq": (QuantFormat.QDQ, QuantType.QInt8),
}
PEER_INT8 = ("litert int8", *ORT_INT8)
PEER_FP32 = ("litert fp32", "ort fp32")
OURS = ("ohq-tvm fp32", "ohq-tvm int8")
# issue #25: ohq-tvm int8 / fastest peer int8, ohq-tvm fp32 / fastest peer fp32, OHQ plan / fastest peer int8
INT8_TARGET, FP32_TARGET, PLAN_TARGET = 1.0, 1.2, 0.9
Runner = Callable[[np.ndarray], np.ndarray]  # [1, 3, 224, 224] float32 -> logits


@dataclass(frozen=True)
class RealModel:
    """A torch model exported both ways, and the photos in its preprocessing."""

    torch_model: object  # torch.nn.Module, in eval mode: what LiteRT's converter takes
    fp32_onnx: Path  # BatchNorm folded, input ``input``: what ONNX Runtime's peers are built from
    with_bn: Path  # BatchNorm kept: what ohq-tvm compiles (MQE reads its statistics)
    photos: PhotoSet


def real_model(source: tuple[Callable, Preprocessing], folder: Path) -> RealModel:
    """The model ``source`` = (loader, preprocessing) of a benchmark's ``MODELS`` registry, exported into
    ``folder`` (made here) with its views and calibration crops."""
    load, preprocessing = source
    model = load().eval()
    folder.mkdir(parents=True)
    shape = (1, 3, 224, 224)
    fp32 = Path(pretrained.export_onnx(model, shape, str(folder / "fp32.onnx")))
    with_bn = Path(pretrained.export_onnx(model, shape, str(folder / "bn.onnx"), keep_batchnorm=True))
    return RealModel(model, fp32, with_bn, photo_set(preprocessing, folder / "calibration"))


@dataclass(frozen=True)
class Engine:
    """One built engine: its model file, how it runs a batch, and its timer on the timing batch."""

    path: Path
    run: Runner
    timer: Timer


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

    def timer(self, x_nchw: np.ndarray) -> Timer:
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


def litert_models(model, calibration: list[np.ndarray], scratch: Path) -> dict[str, Path]:
    """``litert fp32`` converted by litert-torch from the torch ``model`` (NHWC input) and ``litert int8``
    quantized from it, calibrated on ``calibration`` (NCHW crops)."""
    import litert_torch
    import torch
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


def ort_engine(path: Path, x: np.ndarray, threads: int) -> Engine:
    """An ONNX Runtime CPU session on ``threads`` threads, its model's one input named ``input``."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    timer = ort_timer(onnx.load(str(path)), {"input": x}, threads)
    return Engine(path, lambda v: session.run(None, {"input": v})[0], timer)


def litert_engine(path: Path, x: np.ndarray, threads: int) -> Engine:
    interpreter = LiteRT(path, threads)
    return Engine(path, interpreter, interpreter.timer(x))


def tvm_engine(library_path: Path, x: np.ndarray) -> Engine:
    """An exported ohq-tvm library as a Relax VM on this machine (TVM's threads: ``use_host_threads``)."""
    vm = host_vm(tvm.runtime.load_module(str(library_path)))
    timer = tvm_timer(tvm.runtime.load_module(str(library_path)), [tvm.runtime.tensor(x)])
    return Engine(library_path, lambda v: vm["main"](tvm.runtime.tensor(v)).numpy(), timer)


def build_peers(model: RealModel, scratch: Path, threads: int) -> dict[str, Engine]:
    """Every peer of :data:`PEER_FP32` and :data:`PEER_INT8` from ``model``'s torch module and fp32 ONNX
    export, calibrated on its photos' calibration crops, timed on its first view; files in ``scratch``.
    Raises whatever the converter or quantizer raise (a model they cannot take)."""
    calibration, x = model.photos.calibration, model.photos.views[0]
    paths = {
        **litert_models(model.torch_model, calibration, scratch),
        **ort_models(model.fp32_onnx, calibration, scratch),
    }
    return {
        engine: (litert_engine if engine.startswith("litert") else ort_engine)(path, x, threads)
        for engine, path in paths.items()
    }


def peer_settings() -> dict:
    """What a record says about how the peers were built: versions, calibration."""
    return {
        "litert": version("ai-edge-litert"),
        "litert_torch": version("litert-torch"),
        "ai_edge_quantizer": version("ai-edge-quantizer"),
        "torch": version("torch"),
        "calibration": f"held-out photos {list(SKIMAGE_CALIBRATION)} (5 views each), minmax",
        "ort_int8": "quantize_static after quant_pre_process, per-channel int8 weights, minmax; u8s8 "
        "(uint8 activations) as QDQ and QOperator, s8s8 (int8 activations, ORT's default) as QDQ",
        "litert_int8": "ai-edge-quantizer static_wi8_ai8, min/max over all crops, int8 input and output",
    }


def fastest(medians: dict[str, float], engines: tuple[str, ...]) -> str:
    """The fastest of ``engines`` that were timed."""
    return min((e for e in engines if e in medians), key=medians.__getitem__)


def _against(ours: str, m: dict[str, float], peer: str, target: float) -> str:
    ratio = m[ours] / m[peer]
    return f"{ours} {ratio:.2f}x it (target ≤ {target}: {'met' if ratio <= target else 'not met'})"


def target_lines(
    rows: list[dict], int8: tuple[str, ...] = ("ohq-tvm int8",), fp32: tuple[str, ...] = ("ohq-tvm fp32",)
) -> list[str]:
    """Per model (``row["median_ms"]``): the fastest engine, the fastest peer int8 and fp32 and ohq-tvm's
    ratios to them (the fastest of ``int8`` / ``fp32`` that ran), and the OHQ plan's (``ohq plan``) where
    it ran, each met or not against the targets of issue #25."""
    lines = []
    for row in rows:
        m = row["median_ms"]
        peer_int8, peer_fp32 = fastest(m, PEER_INT8), fastest(m, PEER_FP32)
        overall = min(m, key=m.__getitem__)
        line = (
            f"- {row['model']}: fastest engine {overall} ({m[overall]:.2f} ms); fastest peer int8 "
            f"{peer_int8} ({m[peer_int8]:.2f} ms): {_against(fastest(m, int8), m, peer_int8, INT8_TARGET)}"
        )
        if "ohq plan" in m:
            line += f", {_against('ohq plan', m, peer_int8, PLAN_TARGET)}"
        lines.append(
            f"{line}; fastest peer fp32 {peer_fp32} ({m[peer_fp32]:.2f} ms): "
            f"{_against(fastest(m, fp32), m, peer_fp32, FP32_TARGET)}"
        )
    return lines
