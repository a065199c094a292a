"""Layer identity: ids are the ONNX node names, unique, and survive other passes; layer records are exact."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax

from ohq_tvm import models
from ohq_tvm.calibration import calibrate
from ohq_tvm.errors import OHQError
from ohq_tvm.frontend import load_onnx, synthetic_inputs
from ohq_tvm.layers import quantizable_layers
from ohq_tvm.passes import (
    LAYERS_ATTR,
    AnnotateCandidates,
    ApplyPlan,
    AssignLayerIds,
    InsertPrecisionMasks,
    layer_id_of,
)
from ohq_tvm.plan import Plan

from testing_support import host_target

TINY_LAYERS = ["stem_conv", "dw1", "pw1", "expand2", "dw2", "project2", "classifier"]


def layer_names(mod: tvm.IRModule) -> list[str]:
    return [layer.layer_id for layer in quantizable_layers(mod)]


def test_import_names_layers_after_their_onnx_nodes():
    mod = load_onnx(models.tiny_cnn()).mod
    assert layer_names(mod) == TINY_LAYERS
    assert dict(mod["main"].attrs[LAYERS_ATTR]) == {name: name for name in TINY_LAYERS}


@pytest.mark.parametrize(("name", "layer"), [("gemm", "fc0"), ("matmul", "matmul0"), ("conv", "conv0")])
def test_gemm_matmul_and_conv_are_found(name, layer):
    assert layer_names(load_onnx(models.MODELS[name]()).mod) == [layer]


def test_ids_survive_stock_passes_and_the_build():
    imported = load_onnx(models.tiny_cnn())
    seq = tvm.transform.Sequential(
        [
            relax.transform.FoldConstant(),
            relax.transform.CanonicalizeBindings(),
            relax.transform.DeadCodeElimination(),
        ]
    )
    mod = seq(imported.mod)
    assert layer_names(mod) == TINY_LAYERS
    # Renaming variables changes nothing the module computes.
    feeds = synthetic_inputs(imported.inputs)
    args = [tvm.runtime.tensor(feeds[s.name], tvm.cpu()) for s in imported.inputs]
    before = relax.VirtualMachine(relax.build(imported.mod, host_target()), tvm.cpu())["main"](*args)
    after = relax.VirtualMachine(relax.build(mod, host_target()), tvm.cpu())["main"](*args)
    np.testing.assert_allclose(after.numpy(), before.numpy(), rtol=1e-6, atol=1e-6)


def test_pass_is_idempotent():
    imported = load_onnx(models.tiny_cnn())
    again = AssignLayerIds(imported.onnx_model)(imported.mod)
    tvm.ir.assert_structural_equal(again, imported.mod)


def test_unnamed_and_duplicate_onnx_names_get_unique_ids():
    model = models.residual_model()
    for node in model.graph.node:
        if node.op_type == "Conv":
            node.name = "block/conv" if node.name == "conv0" else ""
    mod = load_onnx(model).mod
    ids = layer_names(mod)
    assert ids[0] == "block_conv" and ids[1].startswith("Conv_")
    assert dict(mod["main"].attrs[LAYERS_ATTR])["block_conv"] == "block/conv"


def test_without_the_onnx_model_ids_are_positional():
    from tvm.relax.frontend.onnx import from_onnx

    mod = AssignLayerIds()(from_onnx(models.tiny_cnn()))
    assert layer_names(mod) == ["conv_0", "conv_1", "conv_2", "conv_3", "conv_4", "conv_5", "dense_0"]


def test_layer_records_are_exact():
    layers = {layer.layer_id: layer for layer in quantizable_layers(load_onnx(models.tiny_cnn()).mod)}
    stem, dw2, fc = layers["stem_conv"], layers["dw2"], layers["classifier"]
    assert (stem.op, stem.input_shape, stem.weight_shape, stem.output_shape) == (
        "conv2d",
        (1, 3, 32, 32),
        (16, 3, 3, 3),
        (1, 16, 16, 16),
    )
    assert stem.strides == (2, 2) and stem.padding == (1, 1, 1, 1)
    assert stem.macs == 16 * 16 * 16 * 3 * 3 * 3
    assert (dw2.op, dw2.groups, dw2.macs) == ("depthwise_conv2d", 72, 72 * 16 * 16 * 9)
    assert layers["expand2"].macs == 72 * 16 * 16 * 24
    assert (fc.op, fc.weight_shape, fc.macs) == ("dense", (24, 10), 240)
    from ohq_tvm import Precision

    assert stem.weight_bytes(Precision.FP32) == 432 * 4
    assert stem.weight_bytes(Precision.INT8) == 432 + 16 * 4
    assert stem.weight_bytes(Precision.INT4W) == 216 + 16 * 4


def test_grouped_conv_is_told_apart_from_depthwise():
    from ohq_tvm.models import _Graph

    g = _Graph(0)
    y = g.conv("input", 8, 16, groups=2, name="grouped")
    layers = quantizable_layers(load_onnx(g.model("grouped", {"input": [1, 8, 8, 8]}, y)).mod)
    assert [(layer.op, layer.groups) for layer in layers] == [("grouped_conv2d", 2)]


def test_layer_id_of_reads_the_binding_name():
    assert layer_id_of(relax.Var("ohq_dw1", relax.TensorType((1,), "float32"))) == "dw1"
    assert layer_id_of(relax.Var("lv3", relax.TensorType((1,), "float32"))) is None


LOWERED_REASON = (
    r"^{} finds no conv/dense layer in main: they are already lowered to TIR functions \(conv2d, "
    r"conv2d1, conv2d2, \.\.\.\), as LegalizeOps and relax\.build's pipeline do; run {} before LegalizeOps$"
)


@pytest.mark.parametrize(
    ("name", "run"),
    [
        ("AssignLayerIds", lambda mod, plan: AssignLayerIds()(mod)),
        ("AnnotateCandidates", lambda mod, plan: AnnotateCandidates(["int8"])(mod)),
        ("ApplyPlan", lambda mod, plan: ApplyPlan(plan)(mod)),
        ("InsertPrecisionMasks", lambda mod, plan: InsertPrecisionMasks(["fp16"])(mod)),
        ("calibrate", lambda mod, plan: calibrate(mod)),
    ],
)
def test_a_pass_after_legalize_ops_says_the_layers_were_lowered(name, run):
    imported = load_onnx(models.tiny_cnn())
    plan = Plan.uniform(quantizable_layers(imported.mod), "fp32")
    lowered = relax.transform.LegalizeOps()(imported.mod)
    assert quantizable_layers(lowered) == []
    with pytest.raises(OHQError, match=LOWERED_REASON.format(name, name)):
        run(lowered, plan)
