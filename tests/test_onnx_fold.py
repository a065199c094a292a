"""Constant subgraphs folded, BatchNormalization and zero Pads folded into Conv in the ONNX graph: same
outputs, layer ids kept."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper, shape_inference

from ohq_tvm import models
from ohq_tvm.frontend import load_onnx
from ohq_tvm.layers import quantizable_layers
from ohq_tvm.onnx_fold import fold_batch_norms, fold_constants, fold_pads_into_convs, graph_constants

from testing_support import same_padded_conv_model


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


def test_batchnorms_sharing_parameters_through_identity_nodes_fold():
    # torch writes parameters equal across layers once, read through Identity nodes: here both BNs
    # (16 channels each) read the first BN's four parameters that way.
    model = models.tiny_cnn()
    first, second = [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    shared = list(first.input[1:])
    identities = []
    for bn in (first, second):
        for i, name in enumerate(shared, start=1):
            alias = f"{bn.name}.param{i}"
            identities.append(helper.make_node("Identity", [name], [alias], name=f"{alias}.copy"))
            bn.input[i] = alias
    nodes = [*identities, *model.graph.node]  # Identities of initializers first: still topological
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    folded, count = fold_batch_norms(model)
    assert count == 2
    assert not any(n.op_type == "BatchNormalization" for n in folded.graph.node)
    copies = {n.output[0] for n in identities}
    assert not any({*n.input, *n.output} & (copies | set(shared)) for n in folded.graph.node)
    assert not {init.name for init in folded.graph.initializer} & set(shared)  # unread: dropped
    x = np.random.default_rng(2).standard_normal((1, 3, 32, 32)).astype(np.float32)
    np.testing.assert_allclose(_run(folded, x), _run(model, x), rtol=1e-4, atol=1e-5)


def _same_padded(pad_inputs=None, mode="constant", readers=("dw",), channels=8):
    """input → Pad (bottom/right by 1, TF "SAME" for stride 2) → depthwise conv(s) stride 2 [→ add]."""
    rng = np.random.default_rng(1)
    inits = [
        numpy_helper.from_array(rng.normal(size=(channels, 1, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(np.array([0, 0, 0, 0, 0, 0, 1, 1], np.int64), "pads"),
        numpy_helper.from_array(np.array([0.0], np.float32), "zero"),
        numpy_helper.from_array(np.array([1.5], np.float32), "value"),
    ]
    nodes = [helper.make_node("Pad", pad_inputs or ["input", "pads"], ["padded"], mode=mode, name="pad")]
    outputs = []
    for name in readers:
        if name == "relu":
            nodes.append(helper.make_node("Relu", ["padded"], ["relu"], name="relu"))
            outputs.append(helper.make_tensor_value_info("relu", TensorProto.FLOAT, [1, channels, 17, 17]))
            continue
        nodes.append(
            helper.make_node(
                "Conv", ["padded", "w"], [name], group=channels, strides=[2, 2], pads=[1, 1, 0, 0], name=name
            )
        )
        outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, channels, 9, 9]))
    graph = helper.make_graph(
        nodes,
        "same_pad",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, channels, 16, 16])],
        outputs,
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_zero_pad_feeding_convs_becomes_their_padding():
    original = _same_padded(["input", "pads", "zero"], readers=("dw", "dw_again"))
    folded, count = fold_pads_into_convs(original)
    assert count == 1 and not any(n.op_type == "Pad" for n in folded.graph.node)
    for conv in folded.graph.node:
        assert conv.input[0] == "input"
        assert list(next(a for a in conv.attribute if a.name == "pads").ints) == [1, 1, 1, 1]
    assert "pads" not in {init.name for init in folded.graph.initializer}
    x = np.random.default_rng(0).standard_normal((1, 8, 16, 16)).astype(np.float32)
    np.testing.assert_allclose(_run(folded, x), _run(original, x), rtol=1e-5, atol=1e-6)
    # Imported: no pad operator left in Relax, and the conv keeps its ONNX name as layer id.
    imported = load_onnx(original)
    assert "nn.pad" not in imported.mod.script() and "R.call_tir" not in imported.mod.script()
    assert [layer.layer_id for layer in quantizable_layers(imported.mod)] == ["dw", "dw_again"]


def test_pads_that_are_not_zero_constants_or_feed_other_ops_stay():
    for model in (
        _same_padded(mode="reflect"),
        _same_padded(["input", "pads", "value"]),  # pads with 1.5, not 0
        _same_padded(readers=("dw", "relu")),  # also read by a non-conv
    ):
        folded, count = fold_pads_into_convs(model)
        assert count == 0 and sum(n.op_type == "Pad" for n in folded.graph.node) == 1


def test_shape_arithmetic_folds_into_constant_pads_and_shapes():
    model = shape_inference.infer_shapes(same_padded_conv_model(height=15, width=16))
    folded, count = fold_constants(model)
    assert [n.op_type for n in folded.graph.node] == ["Pad", "Conv", "Reshape"]
    assert count == len(model.graph.node) - 3
    pad, _, reshape = folded.graph.node
    constants = graph_constants(folded.graph)
    # SAME padding of a stride-2 3x3 conv: 15 rows need 1 + 1, 16 columns 0 + 1.
    assert constants[pad.input[1]].tolist() == [0, 0, 1, 0, 0, 0, 1, 1]
    assert constants[reshape.input[1]].tolist() == [1, -1]
    # Nothing is left that the three nodes do not read.
    read = {name for node in folded.graph.node for name in node.input}
    produced = {name for node in folded.graph.node for name in node.output}
    assert {init.name for init in folded.graph.initializer} == read - produced - {"input"}
    x = np.random.default_rng(3).standard_normal((1, 3, 15, 16)).astype(np.float32)
    np.testing.assert_array_equal(_run(folded, x), _run(model, x))


def test_values_that_change_each_run_or_would_grow_are_not_folded():
    shape = numpy_helper.from_array(np.array([1, 8, 32, 32], np.int64), "shape")
    nodes = [
        helper.make_node("ConstantOfShape", ["shape"], ["filled"], name="big"),  # 8192 elements from 4
        helper.make_node("RandomUniformLike", ["input"], ["noise"], name="noise"),
        helper.make_node("Add", ["input", "filled"], ["sum"], name="add"),
        helper.make_node("Add", ["sum", "noise"], ["output"], name="add_noise"),
    ]
    graph = helper.make_graph(
        nodes,
        "unfoldable",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 8, 32, 32])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 8, 32, 32])],
        [shape],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    folded, count = fold_constants(model)
    assert count == 0 and [n.name for n in folded.graph.node] == ["big", "noise", "add", "add_noise"]
