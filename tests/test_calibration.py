"""Calibration: layer inputs observed on the host, ranges per method, samples from files, JSON."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from ohq_tvm import OHQError, models
from ohq_tvm.calibration import (
    Calibration,
    Observation,
    calibrate,
    choose_range,
    layer_input_probe,
    load_samples,
    observe,
    synthetic_batches,
)
from ohq_tvm.frontend import TensorSpec, load_onnx, module_inputs
from ohq_tvm.input_stats import matched_input_statistics


@pytest.fixture(scope="module")
def tiny():
    return load_onnx(models.tiny_cnn())


def _observation(values: np.ndarray) -> Observation:
    found = Observation()
    found.add(values, values.size, np.random.default_rng(0))
    return found


def test_probe_returns_each_distinct_layer_input_once(tiny):
    probe, readers = layer_input_probe(tiny.mod)
    assert [ids for ids in readers] == [
        ["stem_conv"],
        ["dw1"],
        ["pw1"],
        ["expand2"],
        ["dw2"],
        ["project2"],
        ["classifier"],
    ]
    assert len(probe["main"].ret_ty.fields) == 7


def test_first_layer_minmax_is_exactly_the_data_range(tiny):
    batches = synthetic_batches(tiny.inputs, 3, seed=5)
    calibration = calibrate(tiny, "minmax", samples=batches)
    stacked = np.stack([b["input"] for b in batches])
    assert calibration.ranges["stem_conv"] == (float(stacked.min()), float(stacked.max()))
    assert calibration.source == "samples" and calibration.num_samples == 3
    # Post-ReLU inputs start at exactly zero.
    assert calibration.ranges["dw1"][0] == 0.0
    assert set(calibration.ranges) == {"stem_conv", "dw1", "pw1", "expand2", "dw2", "project2", "classifier"}


def test_observed_inputs_match_the_float_model(tiny):
    batch = synthetic_batches(tiny.inputs, 1, seed=9)
    observed = observe(tiny.mod, tiny.inputs, batch)
    np.testing.assert_array_equal(
        np.sort(observed["stem_conv"].values), np.sort(batch[0]["input"].reshape(-1))
    )


def test_percentile_and_entropy_clip_a_lone_outlier():
    values = np.random.default_rng(0).uniform(0, 1, 200_000).astype(np.float32)
    values[0] = 100.0
    observation = _observation(values)
    assert choose_range(observation, "minmax") == (float(values.min()), 100.0)
    low, high = choose_range(observation, "percentile", percentile=99.9)
    assert low >= 0 and 0.99 < high < 1.01
    low, high = choose_range(observation, "entropy")
    assert low >= 0 and 0.5 < high < 5.0


def test_entropy_is_symmetric_for_signed_inputs_and_keeps_most_of_a_gaussian():
    values = np.random.default_rng(1).standard_normal(500_000).astype(np.float32)
    low, high = choose_range(_observation(values), "entropy")
    assert low == pytest.approx(-high)
    assert 2.0 < high <= np.abs(values).max()


def test_calibration_json_round_trips(tmp_path, tiny):
    calibration = calibrate(tiny, "percentile", num_samples=2, percentile=99.5)
    loaded = Calibration.load(calibration.save(tmp_path / "cal.json"))
    assert loaded == calibration
    assert loaded.source == "synthetic:gaussian" and loaded.options == {"percentile": 99.5}
    assert loaded.qparams("dw1").zero_point == 0


def test_bad_calibration_inputs_fail_clearly(tmp_path, tiny):
    with pytest.raises(OHQError, match="unknown calibration method 'kl'"):
        calibrate(tiny, "kl")
    with pytest.raises(OHQError, match="unknown synthetic data"):
        synthetic_batches(tiny.inputs, 1, kind="noise")
    with pytest.raises(OHQError, match="not a finite interval"):
        Calibration("minmax", "x", 1, {"a": (2.0, 1.0)})
    with pytest.raises(OHQError, match="no range for layer 'b'"):
        Calibration("minmax", "x", 1, {"a": (0.0, 1.0)}).qparams("b")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(OHQError, match="not JSON"):
        Calibration.load(tmp_path / "bad.json")


def test_npy_samples_with_or_without_batch_dimension(tmp_path, tiny):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "a.npy", rng.standard_normal((3, 32, 32)).astype(np.float32))
    np.save(tmp_path / "b.npy", rng.standard_normal((1, 3, 32, 32)).astype(np.float32))
    batches = load_samples(tmp_path, tiny.inputs)
    assert [b["input"].shape for b in batches] == [(1, 3, 32, 32)] * 2
    np.save(tmp_path / "c.npy", rng.standard_normal((3, 16, 16)).astype(np.float32))
    with pytest.raises(OHQError, match=r"c.npy has shape \[3, 16, 16\]"):
        load_samples(tmp_path, tiny.inputs)
    with pytest.raises(OHQError, match="do not exist"):
        load_samples(tmp_path / "missing", tiny.inputs)
    (tmp_path / "empty").mkdir()
    with pytest.raises(OHQError, match=r"no \.npy or image files"):
        load_samples(tmp_path / "empty", tiny.inputs)


def test_image_samples_are_resized_cropped_and_normalised(tmp_path, tiny):
    from PIL import Image

    pixels = np.zeros((40, 64, 3), np.uint8)
    pixels[..., 0] = 255  # pure red
    Image.fromarray(pixels).save(tmp_path / "red.png")
    (batch,) = load_samples(tmp_path, tiny.inputs, normalization="tf")
    image = batch["input"]
    assert image.shape == (1, 3, 32, 32)
    np.testing.assert_allclose(image[0, 0], 1.0)
    np.testing.assert_allclose(image[0, 1:], -1.0)
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(OHQError, match="cannot read image"):
        load_samples(tmp_path, tiny.inputs)


def _conv_bn_model(mean_in, std_in, seed=0):
    """Conv(3→8) → BN whose running statistics are the exact conv-output statistics for inputs with
    per-channel ``mean_in``/``std_in`` and independent pixels."""
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((8, 3, 3, 3)).astype(np.float32)
    bias = rng.standard_normal(8).astype(np.float32)
    mean = bias + weight.sum(axis=(2, 3)) @ mean_in
    var = (weight**2).sum(axis=(2, 3)) @ (std_in**2)
    inits = [
        numpy_helper.from_array(weight, "w"),
        numpy_helper.from_array(bias, "b"),
        numpy_helper.from_array(np.ones(8, np.float32), "gamma"),
        numpy_helper.from_array(np.zeros(8, np.float32), "beta"),
        numpy_helper.from_array(mean.astype(np.float32), "mean"),
        numpy_helper.from_array(var.astype(np.float32), "var"),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["output"], name="bn"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 8, 16, 16])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_matched_synthetic_data_recovers_the_training_input_statistics():
    mean_in = np.array([0.4, -0.3, 1.2], np.float32)
    std_in = np.array([0.5, 1.5, 0.8], np.float32)
    model = _conv_bn_model(mean_in, std_in)
    name, mean, std = matched_input_statistics(model)
    assert name == "input"
    np.testing.assert_allclose(mean, mean_in, atol=1e-4)
    np.testing.assert_allclose(std, std_in, atol=1e-3)
    imported = load_onnx(model)
    (batch,) = synthetic_batches(imported.inputs, 1, "matched", onnx_model=model)
    x = batch["input"][0]
    np.testing.assert_allclose(x.mean(axis=(1, 2)), mean_in, atol=0.25)
    calibration = calibrate(imported, "minmax", num_samples=2, synthetic="matched")
    assert calibration.source == "synthetic:matched"


def test_matched_data_needs_a_batchnorm_after_the_first_conv(tiny):
    # The generated conv model has no BN: nothing to match, and the error says what to use instead.
    with pytest.raises(OHQError, match="use gaussian"):
        matched_input_statistics(models.conv_model())


def test_a_relax_module_is_calibrated_on_the_inputs_its_specs_name(tiny):
    spec = TensorSpec("input", (1, 3, 32, 32), "float32")
    assert module_inputs(tiny.mod) == [spec]
    with pytest.raises(OHQError, match=r"^input specs name image; main's inputs are input$"):
        calibrate(tiny.mod, inputs=[TensorSpec("image", (1, 3, 32, 32), "float32")])
    with pytest.raises(OHQError, match=r"^input spec input \[1, 3, 64, 64\] contradicts main's"):
        calibrate(tiny.mod, inputs=[TensorSpec("input", (1, 3, 64, 64), "float32")])
    with pytest.raises(OHQError, match=r"draws random synthetic data, not 'distilled'"):
        calibrate(tiny.mod, synthetic="distilled")
    from_module = calibrate(tiny.mod, "minmax", num_samples=2, inputs=[spec])
    assert from_module.ranges == calibrate(tiny, "minmax", num_samples=2).ranges
