"""Quantization arithmetic: activation ranges, per-channel weights, int4 packing."""

from __future__ import annotations

import numpy as np
import pytest

from ohq_tvm import Precision
from ohq_tvm.qparams import ActivationQParams, pack_int4, quantize_weight, unpack_int4


def test_non_negative_range_uses_all_256_levels_from_zero():
    qp = ActivationQParams.from_range(0.0, 6.0)
    assert qp.zero_point == 0
    assert qp.scale == pytest.approx(6.0 / 255)
    np.testing.assert_array_equal(qp.quantize(np.array([0.0, 3.0, 6.0, 7.0, -1.0])), [0, 128, 255, 255, 0])


def test_signed_range_puts_zero_exactly_on_a_level():
    qp = ActivationQParams.from_range(-1.0, 3.0)
    assert qp.zero_point == 64
    assert qp.dequantize(qp.quantize(np.zeros(3, np.float32))).tolist() == [0.0, 0.0, 0.0]
    x = np.linspace(-1, 3, 101, dtype=np.float32)
    assert np.abs(qp.dequantize(qp.quantize(x)) - x).max() <= qp.scale / 2 + 1e-7


def test_range_is_widened_to_contain_zero_and_degenerate_ranges_work():
    assert ActivationQParams.from_range(2.0, 5.0).zero_point == 0  # [0, 5]
    assert ActivationQParams.from_range(-5.0, -2.0).zero_point == 255  # [-5, 0]
    assert ActivationQParams.from_range(0.0, 0.0).scale > 0
    with pytest.raises(ValueError):
        ActivationQParams(0.0, 0)
    with pytest.raises(ValueError):
        ActivationQParams(1.0, 300)


def test_rounding_is_half_to_even_like_the_graph():
    qp = ActivationQParams(1.0, 0)
    np.testing.assert_array_equal(qp.quantize(np.array([0.5, 1.5, 2.5])), [0, 2, 2])


@pytest.mark.parametrize(("precision", "qmax"), [(Precision.INT8, 127), (Precision.INT4W, 7)])
def test_weights_are_symmetric_per_output_channel(precision, qmax):
    w = np.random.default_rng(0).standard_normal((6, 3, 3, 3)).astype(np.float32)
    w[2] *= 100  # a loud channel must not cost the others their resolution
    w[4] = 0  # a silent channel gets scale 1, values 0
    qw = quantize_weight(w, precision, axis=0)
    assert qw.values.dtype == np.int8
    peaks = np.abs(qw.values).reshape(6, -1).max(axis=1)
    assert peaks.tolist() == [qmax, qmax, qmax, qmax, 0, qmax]
    assert qw.scales[4] == 1.0
    error = np.abs(qw.dequantize() - w).reshape(6, -1).max(axis=1)
    assert np.all(error <= qw.scales / 2 + 1e-6)
    assert qw.channel_sums().tolist() == qw.values.astype(np.int64).reshape(6, -1).sum(axis=1).tolist()


def test_dense_weights_quantize_along_the_output_axis():
    w = np.random.default_rng(1).standard_normal((10, 4)).astype(np.float32)
    qw = quantize_weight(w, Precision.INT8, axis=1)
    assert qw.scales.shape == (4,)
    np.testing.assert_allclose(qw.scales, np.abs(w).max(axis=0) / 127, rtol=1e-6)


@pytest.mark.parametrize("count", [1, 7, 8, 255])
def test_int4_packing_round_trips_two_values_per_byte(count):
    values = np.random.default_rng(count).integers(-8, 8, count).astype(np.int8)
    packed = pack_int4(values)
    assert packed.dtype == np.uint8 and packed.size == (count + 1) // 2
    np.testing.assert_array_equal(unpack_int4(packed, count), values)


def test_int4_packing_layout_is_offset_binary_low_nibble_first():
    assert pack_int4(np.array([-8, 7], np.int8)).tolist() == [0xF0]
    assert pack_int4(np.array([0, -1], np.int8)).tolist() == [0x78]
    with pytest.raises(ValueError):
        pack_int4(np.array([8]))
