"""MQE: the compiled-once masked model equals separately built single-layer models; sensitivities."""

from __future__ import annotations

import numpy as np
import pytest

from ohq_tvm import Precision, models
from ohq_tvm.board import TrackerBoard
from ohq_tvm.calibration import calibrate
from ohq_tvm.errors import OHQError
from ohq_tvm.frontend import load_onnx, synthetic_inputs
from ohq_tvm.layers import quantizable_layers
from ohq_tvm.mqe import Sensitivity, estimate_sensitivity, kl_divergence
from ohq_tvm.passes import ApplyPlan
from ohq_tvm.passes.mask import InsertPrecisionMasks, mask_layout
from ohq_tvm.plan import Plan

from testing_support import run_local

INT8, INT4W, FP16, FP32 = Precision.INT8, Precision.INT4W, Precision.FP16, Precision.FP32


@pytest.fixture(scope="module")
def tiny():
    imported = load_onnx(models.tiny_cnn())
    return imported, calibrate(imported, "minmax", num_samples=2)


@pytest.mark.slow  # about a minute on a 2-core host: `make test-slow`
def test_one_mask_entry_equals_the_separately_built_single_layer_plan(tiny):
    imported, calibration = tiny
    masked = InsertPrecisionMasks([INT8, INT4W, FP16], calibration)(imported.mod)
    layers, columns = mask_layout(masked)
    assert layers == [info.layer_id for info in quantizable_layers(imported.mod)]
    assert columns == [INT8, INT4W, FP16]
    x = synthetic_inputs(imported.inputs, seed=5)["input"]
    mask = np.zeros((len(layers), len(columns)), np.float32)
    (reference,) = run_local(imported.mod, x)
    (unmasked,) = run_local(masked, x, mask)
    np.testing.assert_array_equal(unmasked, reference)  # all-zero mask: the float32 model, exactly
    for row, layer_id in enumerate(layers):
        if layer_id not in ("stem_conv", "dw2", "classifier"):  # first, depthwise, dense: keeps it quick
            continue
        for column, precision in enumerate(columns):
            mask[:] = 0
            mask[row, column] = 1
            (switched,) = run_local(masked, x, mask)
            plan = Plan({lid: precision if lid == layer_id else FP32 for lid in layers})
            (alone,) = run_local(ApplyPlan(plan, calibration)(imported.mod), x)
            # Real integer kernels vs float simulation: equal up to the bias rounding of the int32 path.
            scale = float(np.abs(alone - reference).max())
            assert scale > 0, (layer_id, precision)  # the layer's precision does change the output
            np.testing.assert_allclose(
                switched, alone, rtol=0, atol=max(1e-3 * np.abs(reference).max(), 0.02 * scale)
            )


def test_sensitivity_counts_passes_and_orders_precisions(tiny):
    imported, calibration = tiny
    ticks = []
    result = estimate_sensitivity(
        imported, [INT8, INT4W], calibration, num_batches=2, progress=lambda d, t: ticks.append((d, t))
    )
    assert result.forward_passes == 2 * (1 + 7 * 2) and ticks[-1] == (30, 30)
    assert result.data == "synthetic:gaussian" and result.seconds > 0
    assert all(v >= 0 for row in result.values.values() for v in row.values())
    int8 = sum(row[INT8] for row in result.values.values())
    int4 = sum(row[INT4W] for row in result.values.values())
    assert 0 < int8 < int4
    assert set(result.ranking(INT4W)) == set(result.values)
    again = Sensitivity.from_json(result.to_json())
    assert again.values == result.values and again.forward_passes == result.forward_passes


def test_on_the_board_gives_the_same_numbers(tiny, loopback_board):
    imported, calibration = tiny
    local = estimate_sensitivity(imported, [INT8], calibration, num_batches=1)
    remote = estimate_sensitivity(imported, [INT8], calibration, num_batches=1, board=loopback_board)
    assert remote.board == loopback_board.label
    # The board's session was released: the (single) server takes a new one at once.
    TrackerBoard(
        loopback_board.host, loopback_board.tracker_port, loopback_board.key, wait_for_server_s=3
    ).connect()
    for layer_id, row in local.values.items():
        assert remote.values[layer_id][INT8] == pytest.approx(row[INT8], rel=1e-5, abs=1e-9)


def test_kl_divergence_basics():
    logits = np.array([[1.0, 2.0, 3.0]])
    assert kl_divergence(logits, logits) == pytest.approx(0.0, abs=1e-12)
    assert kl_divergence(logits, logits + 5.0) == pytest.approx(0.0, abs=1e-12)  # softmax is shift-free
    assert kl_divergence(logits, logits[:, ::-1]) > 0.5


def test_masks_need_calibration_for_integer_precisions(tiny):
    imported, _ = tiny
    with pytest.raises(OHQError, match="calibration"):
        InsertPrecisionMasks([INT8])(imported.mod)
    with pytest.raises(OHQError, match="without fp32"):
        InsertPrecisionMasks([FP32, INT8])


@pytest.mark.slow  # 40-80 s on a 2-core host
def test_a_masked_model_whose_float_layers_take_the_channel_form_builds_and_runs():
    # MobileNetV2 at 32x32: its 1x1 convs on 2x2 and 1x1 maps take the fp32 channel form, whose output a
    # precision mask reads twice (``out + m * (other - out)``); that build had failed ("used before its
    # definition"). All-zero masks give the float model exactly; one mask entry switches one layer.
    imported = load_onnx(models.mobilenet_v2(size=32, width=0.5))
    calibration = calibrate(imported, "minmax", num_samples=2)
    masked = InsertPrecisionMasks([INT8], calibration)(imported.mod)
    layers, columns = mask_layout(masked)
    x = synthetic_inputs(imported.inputs, seed=5)["input"]
    mask = np.zeros((len(layers), len(columns)), np.float32)
    (reference,) = run_local(imported.mod, x)
    (unmasked,) = run_local(masked, x, mask)
    np.testing.assert_array_equal(unmasked, reference)
    layer_id = "features_16_expand"  # 1x1 on the 1x1 map
    assert layer_id in layers
    mask[layers.index(layer_id), 0] = 1
    (switched,) = run_local(masked, x, mask)
    plan = Plan({lid: INT8 if lid == layer_id else FP32 for lid in layers})
    (alone,) = run_local(ApplyPlan(plan, calibration)(imported.mod), x)
    scale = float(np.abs(alone - reference).max())
    assert scale > 0
    np.testing.assert_allclose(
        switched, alone, rtol=0, atol=max(1e-3 * np.abs(reference).max(), 0.02 * scale)
    )
