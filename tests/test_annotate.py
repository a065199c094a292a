"""AnnotateCandidates: per-layer precisions follow the board, pins hold, and it composes with TVM passes."""

from __future__ import annotations

import pytest
import tvm
from tvm import relax

from ohq_tvm import OHQError, Precision, models
from ohq_tvm.frontend import load_onnx
from ohq_tvm.passes import AnnotateCandidates, candidates
from ohq_tvm.targets import resolve_target

from testing_support import host_target

FP32, FP16, INT8, INT4W = Precision.FP32, Precision.FP16, Precision.INT8, Precision.INT4W
INNER = ["dw1", "pw1", "expand2", "dw2", "project2"]


@pytest.fixture(scope="module")
def tiny():
    return load_onnx(models.tiny_cnn()).mod


def test_fp16_only_where_the_board_has_it(tiny):
    rk3588 = candidates(AnnotateCandidates(resolve_target("rk3588"))(tiny))
    rpi4b = candidates(AnnotateCandidates(resolve_target("rpi4b"))(tiny))
    for layer in INNER:
        assert rk3588[layer] == (FP32, FP16, INT8, INT4W)
        assert rpi4b[layer] == (FP32, INT8, INT4W)


def test_first_and_last_layers_are_pinned_to_fp32_by_default(tiny):
    table = candidates(AnnotateCandidates(["int8"])(tiny))
    assert table["stem_conv"] == table["classifier"] == (FP32,)
    assert all(table[layer] == (FP32, INT8) for layer in INNER)
    free = candidates(AnnotateCandidates(["int8"], pin_first_last=False)(tiny))
    assert free["stem_conv"] == free["classifier"] == (FP32, INT8)


def test_user_pins_by_layer_id_or_onnx_name(tiny):
    table = candidates(
        AnnotateCandidates(["int8", "int4w"], pinned={"dw2": "fp32", "stem_conv": "int8"})(tiny)
    )
    assert table["dw2"] == (FP32,)
    assert table["stem_conv"] == (INT8,)  # an explicit pin overrides the first-layer default


def test_bad_pins_are_one_clear_error(tiny):
    with pytest.raises(
        OHQError, match=r"pinned layer 'conv9' is not a layer of this model; layers: stem_conv"
    ):
        AnnotateCandidates(["int8"], pinned={"conv9": "fp32"})(tiny)
    with pytest.raises(OHQError, match=r"pinned to fp16, which the board lacks"):
        AnnotateCandidates(resolve_target("rpi4b"), pinned={"dw1": "fp16"})(tiny)


def test_composes_in_a_sequential_and_builds(tiny):
    seq = tvm.transform.Sequential(
        [relax.transform.FoldConstant(), AnnotateCandidates(["int8"]), relax.transform.CanonicalizeBindings()]
    )
    mod = seq(tiny)
    assert set(candidates(mod)) == {"stem_conv", *INNER, "classifier"}
    relax.build(mod, host_target())  # the attribute does not get in the way of building


def test_unannotated_module_has_no_candidates(tiny):
    assert candidates(tiny) == {}
