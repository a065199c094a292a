"""ONNX Runtime's own static int8 quantization, for the accuracy benchmark to compare with.

``quantize_static`` in QDQ format with per-channel int8 weights, calibrated on the same batches as
ohq-tvm, after ``quant_pre_process`` (shape inference and ORT's graph optimisations, as ORT's docs advise).
Two scopes:

- ``conv+gemm+clip, uint8 act``: Conv, Gemm and their Clip/Relu, uint8 activations: the layers and scheme
  ohq-tvm quantizes. (ORT quantizes every quantized op's output tensor too; without Clip in the list it
  quantizes each conv's pre-activation range: Lite0's KL was 0.24 that way in a trial run, 0.11 with it.)
- ``all ops, ORT defaults``: every operator ORT can quantize (Add, Clip, pooling, ...), int8 activations,
  as ORT ships it.

Unlike ohq-tvm, whose int8 layers hand float results to float consumers, ORT's QDQ models also quantize the
outputs, the logits included.

Methods: ``minmax``; ``percentile`` (ORT's defaults: 99.999 over 2,048 bins); ``entropy``. As ORT
ships it (the ``all ops`` scope), ``entropy`` is ``quantize_static``'s default of 128 histogram bins and
128 quantized bins, which leaves its KL search one candidate threshold, the histogram's full range (in a
trial run its models scored exactly as ``minmax``'s). In the ``conv+gemm+clip`` scope, ``entropy`` uses
1,024 bins instead, run through ORT's own calibrator and handed to ``quantize_static`` as its calibration
cache (``quantize_static`` cannot set the bin count; 2,048 bins took a minute per calibration here).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quant_pre_process,
    quantize_static,
)
from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

ENTROPY_BINS = 1024  # in the conv+gemm+clip scope
SAME_LAYERS = "conv+gemm+clip, uint8 act"
_CALIBRATION = {
    "minmax": CalibrationMethod.MinMax,
    "percentile": CalibrationMethod.Percentile,
    "entropy": CalibrationMethod.Entropy,
}
_SCOPES = {
    SAME_LAYERS: {
        "op_types_to_quantize": ["Conv", "Gemm", "Clip", "Relu"],
        "activation_type": QuantType.QUInt8,
    },
    "all ops, ORT defaults": {},
}
# (scope, method) pairs the benchmark runs.
ORT_CONFIGS = [(scope, method) for scope in _SCOPES for method in _CALIBRATION]
ORT_SETTINGS = {
    "format": "QDQ",
    "per_channel": True,
    "weight_type": "QInt8",
    "pre_process": "quant_pre_process (defaults)",
    "percentile": "99.999, 2048 bins (ORT default)",
    "entropy_bins": ENTROPY_BINS,
    "entropy": {
        SAME_LAYERS: f"{ENTROPY_BINS} bins, 128 quantized bins (ORT calibrator, as cache)",
        "all ops, ORT defaults": "quantize_static's default, 128 bins and 128 quantized bins",
    },
    "scopes": {
        SAME_LAYERS: "op_types_to_quantize=[Conv, Gemm, Clip, Relu], activation_type=QUInt8",
        "all ops, ORT defaults": "op_types_to_quantize=None (all), activation_type=QInt8 (default)",
    },
    "threads": 1,
}


class InputBatches(CalibrationDataReader):
    """ONNX Runtime's calibration reader over batches of the model's one input, named ``input``."""

    def __init__(self, batches: list[np.ndarray]) -> None:
        self._feeds = iter([{"input": b} for b in batches])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def ort_session(model: onnx.ModelProto | Path) -> ort.InferenceSession:
    """One-thread CPU session (the machine is shared; accuracy does not depend on threads)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def ort_static_int8(
    fp32_path: Path, batches: list[np.ndarray], method: str, scope: str, scratch: Path
) -> onnx.ModelProto:
    """The QDQ model ``quantize_static`` makes from ``fp32_path`` calibrated on ``batches``."""
    prepared = scratch / f"{fp32_path.stem}.pre.onnx"
    if not prepared.exists():
        quant_pre_process(str(fp32_path), str(prepared))
    out = scratch / f"{fp32_path.stem}.ort-int8.onnx"
    reader, cache = InputBatches(batches), None
    if method == "entropy" and scope == SAME_LAYERS:
        cache = scratch / f"{fp32_path.stem}.entropy-cache.json"
        calibrator = create_calibrator(
            prepared,
            _SCOPES[scope].get("op_types_to_quantize", []),
            augmented_model_path=str(scratch / "augmented.onnx"),
            calibrate_method=CalibrationMethod.Entropy,
            extra_options={"num_bins": ENTROPY_BINS},
        )
        calibrator.collect_data(reader)
        save_tensors_data(calibrator.compute_data(), cache)
        reader = None
    try:
        quantize_static(
            str(prepared),
            str(out),
            reader,
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            weight_type=QuantType.QInt8,
            calibrate_method=_CALIBRATION[method],
            calibration_cache_path=cache,
            **_SCOPES[scope],
        )
    finally:
        if cache is not None:
            cache.unlink(missing_ok=True)
    return onnx.load(str(out))
