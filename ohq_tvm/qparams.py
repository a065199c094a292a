"""Quantization arithmetic shared by the rewrite pass, the QDQ exporter and the tests' integer references.

One scheme, stated once:

- **Weights**: symmetric, per output channel. ``int8`` uses ``[-127, 127]``, ``int4w`` uses ``[-7, 7]``;
  ``scale[o] = max|w[o]| / qmax`` (a channel of zeros gets scale 1). ``int4w`` values are stored two per
  byte (offset binary, ``q + 8`` in each nibble, low nibble first) because TVM's own int4 storage is
  broken.
- **Activations**: uint8 per tensor, asymmetric: ``q = clip(round(x / scale) + zero_point, 0, 255)``
  with round-half-to-even (what TVM's ``round`` and numpy's ``rint`` both do). A range that starts at 0
  (post-ReLU) gets ``zero_point = 0`` and all 256 levels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .precision import Precision

ACTIVATION_DTYPE = "uint8"
ACTIVATION_QMIN, ACTIVATION_QMAX = 0, 255


def weight_qmax(precision: Precision) -> int:
    """Largest weight magnitude representable in ``precision`` (symmetric range)."""
    if precision is Precision.INT8:
        return 127
    if precision is Precision.INT4W:
        return 7
    raise ValueError(f"{precision} has no integer weights")


@dataclass(frozen=True)
class ActivationQParams:
    """Per-tensor uint8 quantization of an activation: ``x ≈ (q - zero_point) * scale``."""

    scale: float
    zero_point: int

    def __post_init__(self) -> None:
        if not (self.scale > 0 and np.isfinite(self.scale)):
            raise ValueError(f"activation scale must be positive and finite, not {self.scale}")
        if not ACTIVATION_QMIN <= self.zero_point <= ACTIVATION_QMAX:
            raise ValueError(f"zero point {self.zero_point} is outside uint8")

    @classmethod
    def from_range(cls, low: float, high: float) -> ActivationQParams:
        """Cover ``[low, high]`` (widened to include 0, so zero is exact and padding costs nothing)."""
        low, high = min(float(low), 0.0), max(float(high), 0.0)
        if high - low < 1e-8:
            high = low + 1e-8
        scale = np.float32((high - low) / (ACTIVATION_QMAX - ACTIVATION_QMIN))
        zero_point = int(np.clip(np.rint(-low / scale), ACTIVATION_QMIN, ACTIVATION_QMAX))
        return cls(float(scale), zero_point)

    def level(self, x: float) -> float:
        """The (unclipped) quantization level of one value: ``rint(x / scale) + zero_point`` in float32."""
        return float(self._levels(np.float32(x)))

    def _levels(self, x: np.ndarray) -> np.ndarray:
        return np.rint(np.asarray(x, np.float32) / np.float32(self.scale)) + np.float32(self.zero_point)

    def quantize(self, x: np.ndarray) -> np.ndarray:
        """numpy reference of the graph's quantize: float32 divide, rint, shift, clip."""
        return np.clip(self._levels(x), ACTIVATION_QMIN, ACTIVATION_QMAX).astype(np.uint8)

    def dequantize(self, q: np.ndarray) -> np.ndarray:
        return (q.astype(np.int32) - self.zero_point).astype(np.float32) * np.float32(self.scale)

    def to_json(self) -> dict:
        return {"scale": self.scale, "zero_point": self.zero_point, "dtype": ACTIVATION_DTYPE}


@dataclass(frozen=True)
class QuantizedWeight:
    """Integer weight values (int8 array, same shape as the float weight) and per-channel float32 scales."""

    values: np.ndarray
    scales: np.ndarray
    axis: int
    precision: Precision

    def dequantize(self) -> np.ndarray:
        shape = [1] * self.values.ndim
        shape[self.axis] = -1
        return self.values.astype(np.float32) * self.scales.reshape(shape)

    def channel_sums(self) -> np.ndarray:
        """Sum of each output channel's integer weights (int64), for zero-point compensation."""
        other = tuple(a for a in range(self.values.ndim) if a != self.axis)
        return self.values.astype(np.int64).sum(axis=other)


# The bias enters the int32 accumulator as round(bias / (s_x * s_w)); keep it within 2^30 so the sum of
# products still fits beside it.
BIAS_LIMIT = float(1 << 30)


def bias_safe_scales(bias: np.ndarray | None, input_scale: float) -> np.ndarray | None:
    """Per-channel lower bounds on the weight scale that keep ``bias / (input_scale · s_w)`` within
    :data:`BIAS_LIMIT`. A channel whose weights are almost zero (batch norm folded over a dead channel)
    but whose bias is not would otherwise overflow int32; its scale is raised instead (its tiny weights
    round to zero, which they nearly are)."""
    if bias is None:
        return None
    return (np.abs(np.asarray(bias, np.float64).reshape(-1)) / (float(input_scale) * BIAS_LIMIT)).astype(
        np.float32
    )


def quantize_weight(
    weight: np.ndarray, precision: Precision, axis: int, min_scales: np.ndarray | None = None
) -> QuantizedWeight:
    """Symmetric per-channel quantization of ``weight`` along ``axis`` (the output channels); ``min_scales``
    (see :func:`bias_safe_scales`) raises the scale of the channels that need it."""
    qmax = weight_qmax(precision)
    w = np.asarray(weight, np.float32)
    other = tuple(a for a in range(w.ndim) if a != axis)
    peak = np.abs(w).max(axis=other) if other else np.abs(w)
    scales = np.where(peak > 0, peak / qmax, 1.0).astype(np.float32)
    if min_scales is not None:
        scales = np.maximum(scales, min_scales).astype(np.float32)
    shape = [1] * w.ndim
    shape[axis] = -1
    values = np.clip(np.rint(w / scales.reshape(shape)), -qmax, qmax).astype(np.int8)
    return QuantizedWeight(values, scales, axis, precision)


def pack_int4(values: np.ndarray) -> np.ndarray:
    """Pack int values in [-8, 7] two per byte (offset binary, low nibble first); pads an odd count."""
    flat = np.asarray(values, np.int16).reshape(-1)
    if flat.size and (flat.min() < -8 or flat.max() > 7):
        raise ValueError("int4 values must lie in [-8, 7]")
    nibbles = (flat + 8).astype(np.uint8)
    if nibbles.size % 2:
        nibbles = np.append(nibbles, np.uint8(8))
    return (nibbles[0::2] | (nibbles[1::2] << 4)).astype(np.uint8)


def unpack_int4(packed: np.ndarray, count: int) -> np.ndarray:
    """Inverse of :func:`pack_int4`: the first ``count`` values as int8."""
    packed = np.asarray(packed, np.uint8).reshape(-1)
    nibbles = np.empty(packed.size * 2, np.int16)
    nibbles[0::2] = packed & 0x0F
    nibbles[1::2] = packed >> 4
    return (nibbles[:count] - 8).astype(np.int8)
