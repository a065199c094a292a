"""An XGBoost model of a board's operator latencies, trained on its measurements.

Predicts workloads not measured yet (another model's layers, a precision skipped under a budget) from
what they compute: MACs, bytes moved, shapes, kernel, stride, groups, precision, op kind. The target is
log latency, so the model is judged on relative error; its error is always reported as a k-fold
cross-validated MAPE next to any prediction, never hidden.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import OHQError
from ..precision import Precision
from .workloads import Workload

MIN_TRAINING_ROWS = 8
_ROUNDS = 300
_OPS = ("conv2d", "depthwise_conv2d", "grouped_conv2d", "dense", "quantize", "dequantize")
_KINDS = ("layer", "quantize", "dequantize", "glue")
_PRECISIONS = tuple(Precision)
_ACTIVATION_BYTES = {"float32": 4, "uint8": 1}


def _log(value: float) -> float:
    return math.log1p(max(value, 0.0))


def features(workload: Workload) -> list[float]:
    """The feature vector of one workload (see :data:`FEATURE_NAMES`)."""
    precision = workload.precision
    in_elements = math.prod(workload.input_shape)
    out_elements = math.prod(workload.output_shape) if workload.output_shape else in_elements
    weight_elements = math.prod(workload.weight_shape) if workload.weight_shape else 0
    in_bytes = in_elements * _ACTIVATION_BYTES[workload.input_dtype()]
    integer_out = workload.kind == "quantize" or (workload.kind == "layer" and precision.is_integer)
    out_bytes = out_elements * (1 if integer_out else 4)
    computes = workload.kind == "layer" or workload.fused_layer is not None  # a conv/dense runs
    weight_bytes = weight_elements * precision.weight_bits / 8 if computes else 0
    kernel = workload.weight_shape[-1] if computes and workload.op != "dense" else 1
    stride = workload.strides[0] if workload.strides else 1
    shape = workload.output_shape or workload.input_shape
    out_channels = shape[1] if len(shape) == 4 else shape[-1]
    spatial = math.prod(shape[2:]) if len(shape) == 4 else 1
    op = workload.op if workload.op in _OPS else "glue"
    row = [
        _log(workload.macs),
        _log(in_bytes + out_bytes + weight_bytes),
        _log(in_elements),
        _log(out_elements),
        _log(weight_bytes),
        float(kernel),
        float(stride),
        _log(workload.groups),
        _log(out_channels),
        _log(spatial),
        float(workload.bias),
        float(workload.activation is not None),
        float(workload.input_zero_point),
    ]
    row += [float(op == name) for name in (*_OPS, "glue")]
    row += [float(workload.kind == name) for name in _KINDS]
    row += [float(precision is p) for p in _PRECISIONS]
    return row


FEATURE_NAMES = (
    "log_macs",
    "log_bytes_moved",
    "log_input_elements",
    "log_output_elements",
    "log_weight_bytes",
    "kernel",
    "stride",
    "log_groups",
    "log_output_channels",
    "log_output_spatial",
    "bias",
    "activation",
    "input_zero_point",
    *(f"op_{name}" for name in (*_OPS, "glue")),
    *(f"kind_{name}" for name in _KINDS),
    *(f"precision_{p.value}" for p in _PRECISIONS),
)


class _Booster:
    """xgboost's native API (its scikit-learn wrapper would need scikit-learn)."""

    def __init__(self, seed: int) -> None:
        self.params = {
            "objective": "reg:squarederror",
            "max_depth": 4,
            "eta": 0.08,
            "subsample": 0.9,
            "min_child_weight": 1.0,
            "nthread": 1,
            "seed": seed,
        }
        self.booster = None

    def fit(self, x: np.ndarray, y: np.ndarray) -> _Booster:
        import xgboost  # ~0.3 s to import; only a measurement run with enough rows to train needs it

        data = xgboost.DMatrix(x, label=y, feature_names=list(FEATURE_NAMES))
        self.booster = xgboost.train(self.params, data, num_boost_round=_ROUNDS)
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        import xgboost  # as in fit

        return self.booster.predict(xgboost.DMatrix(x, feature_names=list(FEATURE_NAMES)))


def mape(predicted: np.ndarray, actual: np.ndarray) -> float:
    """Mean absolute percentage error, in percent."""
    return float(np.mean(np.abs(predicted - actual) / actual) * 100)


@dataclass
class LatencyModel:
    """A trained model and its cross-validated error (``cv_mape_percent``, over ``training_rows`` rows)."""

    regressor: object
    cv_mape_percent: float
    folds: int
    training_rows: int

    @classmethod
    def train(
        cls, workloads: Sequence[Workload], latencies_ms: Sequence[float], folds: int = 5, seed: int = 0
    ) -> LatencyModel:
        """Fit on measured ``(workload, median ms)`` pairs; the error is from ``folds``-fold CV.

        Raises :class:`OHQError` with fewer than :data:`MIN_TRAINING_ROWS` rows.
        """
        if len(workloads) != len(latencies_ms):
            raise ValueError("one latency per workload")
        if len(workloads) < MIN_TRAINING_ROWS:
            raise OHQError(
                f"the latency model needs at least {MIN_TRAINING_ROWS} measurements of this board, "
                f"it has {len(workloads)}; measure a model first (`ohq-tvm measure`)"
            )
        x = np.array([features(w) for w in workloads], dtype=np.float64)
        y_ms = np.asarray(latencies_ms, dtype=np.float64)
        if np.any(y_ms <= 0):
            raise ValueError("latencies must be positive")
        y = np.log(y_ms)
        folds = max(2, min(folds, len(workloads)))
        order = np.random.default_rng(seed).permutation(len(workloads))
        predicted = np.empty_like(y)
        for fold in np.array_split(order, folds):
            train = np.setdiff1d(order, fold)
            regressor = _Booster(seed).fit(x[train], y[train])
            predicted[fold] = regressor.predict(x[fold])
        error = mape(np.exp(predicted), y_ms)
        return cls(_Booster(seed).fit(x, y), error, folds, len(workloads))

    def predict_ms(self, workloads: Sequence[Workload]) -> np.ndarray:
        """Predicted median latency (ms) of each workload."""
        if not workloads:
            return np.zeros(0)
        x = np.array([features(w) for w in workloads], dtype=np.float64)
        return np.exp(self.regressor.predict(x))


__all__ = ["FEATURE_NAMES", "MIN_TRAINING_ROWS", "LatencyModel", "features", "mape"]
