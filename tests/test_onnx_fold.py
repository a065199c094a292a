"""BatchNormalization folded into Conv in the ONNX graph: same outputs, layer ids kept."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from onnx import helper

from ohq_tvm import models
from ohq_tvm.frontend import load_onnx
from ohq_tvm.layers import quantizable_layers
from ohq_tvm.onnx_fold import fold_batch_norms


def _run(model, x):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0]


def test_conv_batchnorm_pairs_fold_and_outputs_agree():
    original = models.tiny_cnn()
    assert sum(n.op_type == "BatchNormalization" for n in original.graph.node) == 2
    folded, count = fold_batch_norms(original)
    assert count == 2
    assert not any(n.op_type == "BatchNormalization" for n in folded.graph.node)
    assert sum(n.op_type == "BatchNormalization" for n in original.graph.node) == 2  # input untouched
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    np.testing.assert_allclose(_run(folded, x), _run(original, x), rtol=1e-4, atol=1e-5)


def test_imported_layers_keep_their_onnx_names_after_folding():
    mod = load_onnx(models.tiny_cnn()).mod
    ids = [layer.layer_id for layer in quantizable_layers(mod)]
    assert ids == ["stem_conv", "dw1", "pw1", "expand2", "dw2", "project2", "classifier"]
    assert "batch_norm" not in mod.script()


def test_batchnorm_on_a_shared_conv_output_is_left_alone():
    model = models.tiny_cnn()
    bn = next(n for n in model.graph.node if n.op_type == "BatchNormalization")
    conv_out = bn.input[0]
    # A second reader of the conv output: folding would change what that reader sees.
    model.graph.node.append(helper.make_node("Relu", [conv_out], ["extra"], name="extra_reader"))
    _, count = fold_batch_norms(model)
    assert count == 1
