"""ONNX → Relax: generated models agree with ONNX Runtime; every bad input is one clear error."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tvm
from onnx import TensorProto, helper, numpy_helper
from tvm import relax

from ohq_tvm import Precision, models
from ohq_tvm.calibration import Calibration
from ohq_tvm.errors import ModelImportError
from ohq_tvm.frontend import load_onnx, parse_input_shapes, synthetic_inputs
from ohq_tvm.layers import quantizable_layers
from ohq_tvm.plan import Plan
from ohq_tvm.qdq import export_qdq

from testing_support import every_model_slow_at_full_size, host_target, nms_model, same_padded_conv_model


def run_tvm(imported, feeds: dict[str, np.ndarray]) -> np.ndarray:
    vm = relax.VirtualMachine(relax.build(imported.mod, host_target()), tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(feeds[s.name], tvm.cpu()) for s in imported.inputs])
    return out.numpy()


def run_ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


@pytest.mark.parametrize("name", every_model_slow_at_full_size())
def test_generated_models_match_onnx_runtime(name):
    model = models.MODELS[name]()
    imported = load_onnx(model)
    feeds = synthetic_inputs(imported.inputs, seed=1)
    expected = run_ort(model, feeds)
    got = run_tvm(imported, feeds)
    assert got.shape == expected.shape == imported.outputs[0].shape
    assert float(np.abs(expected).max()) > 0.1  # the comparison is not between two near-zero tensors
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_tiny_cnn_contains_the_layer_kinds_it_promises():
    ops = [node.op_type for node in models.tiny_cnn().graph.node]
    convs = [n for n in models.tiny_cnn().graph.node if n.op_type == "Conv"]
    groups = {next((a.i for a in n.attribute if a.name == "group"), 1) for n in convs}
    assert {"Conv", "BatchNormalization", "Add", "GlobalAveragePool", "Gemm"} <= set(ops)
    assert {1, 16, 72} <= groups  # regular, and two depthwise convolutions


def test_path_and_proto_give_the_same_hash(tmp_path):
    model = models.gemm_model()
    path = models.save(model, tmp_path / "sub" / "gemm.onnx")
    from_path, from_proto = load_onnx(path), load_onnx(model)
    assert from_path.sha256 == from_proto.sha256
    assert from_path.source == str(path) and from_proto.source == "<ModelProto>"


def test_missing_file(tmp_path):
    with pytest.raises(ModelImportError, match=r"nowhere\.onnx does not exist"):
        load_onnx(tmp_path / "nowhere.onnx")


def test_corrupt_file(tmp_path):
    bad = tmp_path / "corrupt.onnx"
    bad.write_bytes(models.conv_model().SerializeToString()[:37] + b"\xff\xfe garbage")
    with pytest.raises(ModelImportError, match=r"corrupt\.onnx is not a valid ONNX model"):
        load_onnx(bad)


def dynamic_batch_model() -> onnx.ModelProto:
    model = models.conv_model()
    model.graph.input[0].type.tensor_type.shape.dim[0].Clear()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    model.graph.output[0].type.tensor_type.shape.dim[0].Clear()
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    return model


def test_dynamic_shape_without_a_value():
    with pytest.raises(ModelImportError) as err:
        load_onnx(dynamic_batch_model())
    message = str(err.value)
    assert "'input'" in message and "dimension 0" in message and "'batch'" in message
    assert "--input-shape input=" in message


def test_dynamic_shape_with_a_value_matches_onnx_runtime():
    model = dynamic_batch_model()
    imported = load_onnx(model, {"input": (2, 3, 16, 16)})
    assert imported.inputs[0].shape == (2, 3, 16, 16)
    assert imported.outputs[0].shape == (2, 16, 16, 16)
    feeds = synthetic_inputs(imported.inputs)
    np.testing.assert_allclose(run_tvm(imported, feeds), run_ort(model, feeds), rtol=1e-4, atol=1e-4)


def test_shape_for_an_unknown_input_lists_the_real_ones():
    with pytest.raises(ModelImportError, match=r"no input named images; its inputs: input"):
        load_onnx(models.conv_model(), {"images": (1, 3, 16, 16)})


def test_shape_of_the_wrong_rank():
    with pytest.raises(ModelImportError, match=r"rank 4, but the given shape 3,16,16 has rank 3"):
        load_onnx(models.conv_model(), {"input": (3, 16, 16)})


def test_unsupported_operators_are_named_by_node():
    model = models.conv_model()
    model.graph.node.insert(
        0, helper.make_node("Relu", ["input"], ["r"], name="custom_relu", domain="com.example")
    )
    model.graph.node.insert(1, helper.make_node("Foo", ["r"], ["f"], name="mystery", domain="com.example"))
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    with pytest.raises(ModelImportError) as err:
        load_onnx(model)
    message = str(err.value)
    assert "custom_relu (com.example::Relu)" in message and "mystery (com.example::Foo)" in message


def test_default_domain_op_the_importer_lacks():
    from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

    op = next(o for o in ["Celu", "LpNormalization", "Swish"] if o not in _get_convert_map())
    assert op not in _get_convert_map()
    graph = helper.make_graph(
        [helper.make_node(op, ["x"], ["y"], name="odd_node")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(ModelImportError, match=rf"odd_node \({op}\)"):
        load_onnx(model)


@pytest.mark.parametrize(
    ("items", "expected"),
    [(["input=1,3,224,224"], {"input": (1, 3, 224, 224)}), (["a=1,2", " b = 3"], {"a": (1, 2), "b": (3,)})],
)
def test_parse_input_shapes(items, expected):
    assert parse_input_shapes(items) == expected


@pytest.mark.parametrize("item", ["input", "input=", "=1,2", "input=1,x", "input=1,0", "input=-1,3"])
def test_parse_input_shapes_rejects(item):
    with pytest.raises(ModelImportError, match="NAME=D0,D1"):
        parse_input_shapes([item])


def test_synthetic_inputs_are_deterministic():
    specs = load_onnx(models.conv_model()).inputs
    a, b = synthetic_inputs(specs, seed=3), synthetic_inputs(specs, seed=3)
    np.testing.assert_array_equal(a["input"], b["input"])
    assert a["input"].dtype == np.float32 and abs(float(a["input"].std()) - 1.0) < 0.1


def test_a_shape_contradicting_a_static_dimension_is_refused():
    with pytest.raises(ModelImportError) as err:
        load_onnx(models.conv_model(size=16), {"input": (1, 3, 64, 64)})
    message = str(err.value)
    assert "input 'input'" in message and "1x3x16x16" in message and "1x3x64x64" in message
    assert load_onnx(models.conv_model(size=16), {"input": (1, 3, 16, 16)}).inputs[0].shape == (1, 3, 16, 16)
    # Only the dynamic dimension is free: the batch of a dynamic-batch model, not its image size.
    with pytest.raises(ModelImportError, match=r"batchx3x16x16"):
        load_onnx(dynamic_batch_model(), {"input": (2, 3, 8, 8)})


def test_dynamic_dimension_hint_keeps_the_static_ones():
    # An NHWC input as TensorFlow exporters write it: only the batch is missing.
    graph = helper.make_graph(
        [helper.make_node("Relu", ["input:0"], ["y"], name="relu")],
        "nhwc",
        [helper.make_tensor_value_info("input:0", TensorProto.FLOAT, ["N", 224, 224, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 224, 224, 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(ModelImportError) as err:
        load_onnx(model)
    assert "dimension 0 ('N')" in str(err.value)
    assert str(err.value).endswith("--input-shape input:0=1,224,224,3")
    # Several dynamic dimensions: the batch is 1, the others are named for the user to fill in.
    for vi in (model.graph.input[0], model.graph.output[0]):
        vi.type.tensor_type.shape.dim[1].dim_param = "height"
        vi.type.tensor_type.shape.dim[2].Clear()
    with pytest.raises(ModelImportError) as err:
        load_onnx(model)
    message = str(err.value)
    assert "dimensions 0 ('N'), 1 ('height'), 2" in message
    assert "--input-shape input:0=1,HEIGHT,D2,3" in message and "HEIGHT, D2" in message


def test_external_weights_are_read_beside_the_model_from_any_folder(tmp_path, monkeypatch):
    model = models.conv_model()
    folder = tmp_path / "model"
    folder.mkdir()
    saved = models.conv_model()  # onnx.save moves the weights of the proto it saves out of it
    onnx.save(saved, folder / "conv.onnx", save_as_external_data=True, location="w.bin", size_threshold=0)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    imported = load_onnx(folder / "conv.onnx")
    feeds = synthetic_inputs(imported.inputs, seed=2)
    np.testing.assert_allclose(run_tvm(imported, feeds), run_ort(model, feeds), rtol=1e-4, atol=1e-4)
    # The hash covers the weights, not only the file naming them.
    weights = bytearray((folder / "w.bin").read_bytes())
    weights[0] ^= 0xFF
    (folder / "w.bin").write_bytes(bytes(weights))
    assert load_onnx(folder / "conv.onnx").sha256 != imported.sha256
    with pytest.raises(ModelImportError, match=r"external files \(w\.bin\).*pass the model's path"):
        load_onnx(onnx.load(folder / "conv.onnx", load_external_data=False))
    (folder / "w.bin").unlink()
    with pytest.raises(ModelImportError, match=r"conv\.onnx.*w\.bin"):
        load_onnx(folder / "conv.onnx")


def _with_opset(model: onnx.ModelProto, version: int) -> onnx.ModelProto:
    old = onnx.ModelProto()
    old.CopyFrom(model)
    del old.opset_import[:]
    old.opset_import.append(helper.make_opsetid("", version))
    return old


def test_an_old_opset_is_upgraded_at_import_so_the_qdq_export_works():
    old = _with_opset(models.conv_model(), 11)
    onnx.checker.check_model(old)
    imported = load_onnx(old)
    assert [(o.domain, o.version) for o in imported.onnx_model.opset_import] == [("", 13)]
    assert imported.notes == ("upgraded <ModelProto> from ONNX opset 11 to 13 with onnx.version_converter",)
    feeds = synthetic_inputs(imported.inputs, seed=4)
    np.testing.assert_array_equal(run_ort(imported.onnx_model, feeds), run_ort(old, feeds))
    layers = quantizable_layers(imported.mod)
    calibration = Calibration("minmax", "test", 1, {layer.layer_id: (-3.0, 3.0) for layer in layers})
    qdq = export_qdq(imported, Plan.uniform(layers, Precision.INT8), calibration)
    assert sum(node.op_type == "DequantizeLinear" for node in qdq.graph.node) >= 2
    assert load_onnx(models.conv_model()).notes == ()  # opset 17: nothing to say


def test_an_opset_that_cannot_be_upgraded_fails_at_import():
    # BatchNormalization with spatial=0 (opset 7) has no form in later opsets.
    channels = numpy_helper.from_array(np.ones(3, np.float32), "c")
    graph = helper.make_graph(
        [helper.make_node("BatchNormalization", ["x", "c", "c", "c", "c"], ["y"], spatial=0, name="bn")],
        "old",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 4, 4])],
        [channels],
    )
    with pytest.raises(ModelImportError) as err:
        load_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 7)]))
    message = str(err.value)
    assert "opset 7" in message and "onnx.version_converter" in message and "spatial" in message
    assert "opset_version" in message  # the fix: export again


def test_shape_arithmetic_as_exporters_write_it_imports_and_matches_onnx_runtime():
    model = same_padded_conv_model(height=15, width=16)
    imported = load_onnx(model)
    assert imported.outputs[0].shape == (1, 4 * 8 * 8)
    script = imported.mod.script()
    # The computed SAME pads became the conv's own (top, left, bottom, right) padding.
    assert "nn.pad" not in script and "padding=[1, 0, 1, 1]" in script
    feeds = synthetic_inputs(imported.inputs, seed=5)
    np.testing.assert_allclose(run_tvm(imported, feeds), run_ort(model, feeds), rtol=1e-4, atol=1e-4)


def test_a_node_the_converter_fails_on_is_named(capsys):
    # Pads that only the input data decides cannot be made constant.
    graph = helper.make_graph(
        [helper.make_node("Pad", ["x", "pads"], ["y"], name="data_pad")],
        "dynamic_pad",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2]),
            helper.make_tensor_value_info("pads", TensorProto.INT64, [4]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["h", "w"])],
    )
    with pytest.raises(ModelImportError, match=r"at node data_pad \(Pad\): Dynamic pads"):
        load_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert capsys.readouterr().out == ""  # the error is the one line: nothing printed besides


def test_operators_whose_output_size_depends_on_the_data_are_named():
    with pytest.raises(ModelImportError) as err:
        load_onnx(nms_model())
    message = str(err.value)
    assert "nms (NonMaxSuppression)" in message and "depends on the input values" in message
