"""Sample batches: the registry of synthetic data makers is the one list of kinds, for the API and the CLI."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from ohq_tvm import OHQError, calibration, models
from ohq_tvm.cli import build_parser
from ohq_tvm.frontend import load_onnx
from ohq_tvm.plan import CALIBRATION_METHODS
from ohq_tvm.samples import (
    NORMALIZATIONS,
    SYNTHETIC_DATA,
    SYNTHETIC_KINDS,
    ModelMadeData,
    RandomData,
    resolve_synthetic,
    synthetic_batches,
    synthetic_data,
)


@pytest.fixture(scope="module")
def tiny():
    return load_onnx(models.tiny_cnn())


def _ones(_onnx_model):
    return lambda _rng, spec: np.ones(spec.shape)


def _never(_imported) -> bool:
    return False


def _always(_imported) -> bool:
    return True


def test_the_registry_names_every_kind_and_calibration_re_exports_it():
    kinds = ("gaussian", "uniform", "matched", "distilled", "inverted")
    assert SYNTHETIC_KINDS == tuple(SYNTHETIC_DATA) == kinds
    assert calibration.SYNTHETIC_KINDS is SYNTHETIC_KINDS
    assert calibration.synthetic_data is synthetic_data and calibration.synthetic_batches is synthetic_batches
    assert [isinstance(maker, RandomData) for maker in SYNTHETIC_DATA.values()] == [1, 1, 1, 0, 0]


def test_the_cli_offers_what_the_registries_hold(monkeypatch):
    monkeypatch.setitem(SYNTHETIC_DATA, "ones", RandomData(_ones))
    parser = build_parser()
    compile_args = ["compile", "m.onnx", "-o", "out"]
    args = parser.parse_args([*compile_args, "--synthetic", "ones", "--mqe-data", "ones"])
    assert (args.synthetic, args.mqe_data) == ("ones", "ones")
    assert parser.parse_args(["plan", "m.onnx", "-o", "out", "--mqe-data", "ones"]).mqe_data == "ones"
    for method in CALIBRATION_METHODS:
        assert parser.parse_args([*compile_args, "--calibration", method]).calibration == method
    for name in NORMALIZATIONS:
        assert parser.parse_args([*compile_args, "--normalization", name]).normalization == name


def test_a_registered_maker_is_all_a_new_kind_needs(tiny, monkeypatch):
    monkeypatch.setitem(SYNTHETIC_DATA, "ones", RandomData(_ones))
    (batch,) = synthetic_data(tiny, 1, "ones")
    assert batch["input"].dtype == np.float32 and batch["input"].shape == (1, 3, 32, 32)
    assert np.all(batch["input"] == 1.0)
    assert resolve_synthetic(tiny, "ones") == "ones"
    with pytest.raises(OHQError, match=r"auto, gaussian, uniform, matched, distilled, inverted, ones$"):
        resolve_synthetic(tiny, "twos")


def test_random_kinds_draw_one_generator_batch_by_batch(tiny):
    shape = (1, 3, 32, 32)
    rng = np.random.default_rng(3)
    expected = [rng.standard_normal(shape).astype(np.float32) for _ in range(2)]
    drawn = synthetic_batches(tiny.inputs, 2, seed=3)
    assert all(np.array_equal(b["input"], e) for b, e in zip(drawn, expected, strict=True))
    rng = np.random.default_rng(4)
    (uniform,) = synthetic_batches(tiny.inputs, 1, "uniform", seed=4)
    assert np.array_equal(uniform["input"], rng.uniform(-1.0, 1.0, shape).astype(np.float32))


def test_auto_takes_the_first_model_made_kind_the_model_allows(tiny, monkeypatch):
    distilled, inverted = SYNTHETIC_DATA["distilled"], SYNTHETIC_DATA["inverted"]
    assert isinstance(distilled, ModelMadeData) and isinstance(inverted, ModelMadeData)
    monkeypatch.setitem(SYNTHETIC_DATA, "distilled", replace(distilled, possible=_never))
    monkeypatch.setitem(SYNTHETIC_DATA, "inverted", replace(inverted, possible=_always))
    assert resolve_synthetic(tiny, "auto") == "inverted"
    monkeypatch.setitem(SYNTHETIC_DATA, "inverted", replace(inverted, possible=_never))
    assert resolve_synthetic(tiny, "auto") == "gaussian"
    assert inverted.describe(4) == "inverting the classifier: 4 inputs it assigns to each class in turn"
