"""The README and docs/*.md: their Python snippets run as written (on a generated model), the README stays a
front door (at most 150 lines), and every relative link in them resolves, anchors included."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
import tvm
from tvm import relax

import ohq_tvm
from ohq_tvm import models
from ohq_tvm.board.threads import host_vm
from ohq_tvm.calibration import calibrate
from ohq_tvm.codegen.elf import elf_machine
from ohq_tvm.frontend import load_onnx, synthetic_inputs
from ohq_tvm.passes import ApplyPlan, applied_plan
from ohq_tvm.plan import Plan

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
README_MAX_LINES = 150
TINY_CNN_LAYERS = ["stem_conv", "dw1", "pw1", "expand2", "dw2", "project2", "classifier"]


def documents() -> list[Path]:
    """The README, then every page under docs/."""
    if not README.is_file():
        pytest.skip("needs the source tree next to the tests")
    return [README, *sorted((REPO / "docs").glob("*.md"))]


def python_blocks() -> list[tuple[Path, str]]:
    """Every ```python block of the documents, with the file it is in, in reading order."""
    return [
        (path, block)
        for path in documents()
        for block in re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)
    ]


def snippet(needle: str) -> tuple[Path, str]:
    """The first Python block that contains ``needle`` (its file, its text)."""
    found = [(path, block) for path, block in python_blocks() if needle in block]
    assert found, f"no Python snippet in the README or docs/ contains {needle!r}"
    return found[0]


def run(path: Path, block: str, namespace: dict) -> None:
    exec(compile(block, str(path), "exec"), namespace)


def tiny_cnn_of_any_input_size() -> onnx.ModelProto:
    """tiny_cnn with a dynamic batch, height and width: the snippet's ``load_onnx`` gives them values."""
    model = models.tiny_cnn()
    dims = model.graph.input[0].type.tensor_type.shape.dim
    for index, name in ((0, "batch"), (2, "height"), (3, "width")):
        dims[index].dim_param = name
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    return model


def test_build_script_snippets_run(tmp_path, monkeypatch):
    build_script = snippet("load_onnx")
    passes_script = snippet("AnnotateCandidates")
    rewrite_script = snippet("ApplyPlan")
    models.save(tiny_cnn_of_any_input_size(), tmp_path / "model.onnx")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    run(*build_script, namespace)
    assert elf_machine(tmp_path / "model.so") == "aarch64"
    run(*passes_script, namespace)  # continues with the same board/model
    plan = Plan.load(tmp_path / "plan.json")
    assert plan.target == "rpi5"
    assert plan.counts() == {"fp32": 2, "int8": 5}
    run(*rewrite_script, namespace)  # and rewrites, builds, exports QDQ
    assert applied_plan(namespace["quantized"]) == plan.assignments
    assert 'out_dtype="int32"' in namespace["quantized"].script()
    qdq = onnx.load(str(tmp_path / "model.qdq.onnx"))
    assert sum(node.op_type == "QuantizeLinear" for node in qdq.graph.node) == 5  # one per int8 layer input


def test_from_onnx_snippet_quantizes_like_load_onnx(tmp_path, monkeypatch):
    """TVM's own importer, then AssignLayerIds, calibrate on the module and ApplyPlan: the layers carry
    the ONNX names, the ranges are load_onnx's (BatchNormalization unfolded computes the same values) and
    the built module computes what the load_onnx path's plan does."""
    script = snippet("from_onnx")
    models.save(tiny_cnn_of_any_input_size(), tmp_path / "model.onnx")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    run(*script, namespace)
    imported = load_onnx(tmp_path / "model.onnx", {"input": (1, 3, 224, 224)})
    expected = calibrate(imported, "minmax")
    calibration = namespace["calibration"]
    assert calibration.source == "synthetic:gaussian" and calibration.num_samples == 8
    assert sorted(calibration.ranges) == sorted(expected.ranges) == sorted(TINY_CNN_LAYERS)
    for layer_id, (low, high) in expected.ranges.items():
        assert calibration.ranges[layer_id] == pytest.approx((low, high), rel=1e-4, abs=1e-5)
    assert applied_plan(namespace["lowered"]) == namespace["plan"].assignments
    reference = ApplyPlan(namespace["plan"], expected)(imported.mod)
    x = synthetic_inputs(imported.inputs)["input"]
    ours = host_vm(namespace["executable"])["main"](tvm.runtime.tensor(x)).numpy()
    theirs = host_vm(relax.build(reference, "llvm"))["main"](tvm.runtime.tensor(x)).numpy()
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=0.05 * np.abs(theirs).max())


def test_measurement_snippet_runs(tmp_path, monkeypatch):
    script = snippet("measure_model")
    models.save(models.conv_model(channels=8, size=8), tmp_path / "model.onnx")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    run(*script, namespace)
    predicted = namespace["predicted"]
    assert set(predicted.by_kind()) == {"layer", "quantize", "dequantize"}
    assert predicted.total_ms > 0 and (tmp_path / "oqa.sqlite").is_file()


def _call_keywords(tree: ast.AST, name: str) -> list[set[str]]:
    """The keyword names of every call to ``ohq_tvm.<name>(...)`` in ``tree``."""
    return [
        {keyword.arg for keyword in node.keywords if keyword.arg}
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and ast.unparse(node.func) == f"ohq_tvm.{name}"
    ]


def test_compile_model_snippets_use_the_api_as_it_is():
    """The compile_model examples (README and docs) need a board at a tracker, so they are not run: their
    keywords and the result attributes they read are checked against the functions and CompileResult."""
    blocks = [(path, block) for path, block in python_blocks() if "ohq_tvm.compile_model(" in block]
    assert {path.name for path, _ in blocks} >= {"README.md", "python-api.md"}
    result_fields = {field.name for field in dataclasses.fields(ohq_tvm.CompileResult)}
    result_fields |= {name for name, _ in inspect.getmembers(ohq_tvm.CompileResult, inspect.isdatadescriptor)}
    for path, block in blocks:
        tree = ast.parse(block)
        for name in ("compile_model", "BoardConnection"):
            accepted = set(inspect.signature(getattr(ohq_tvm, name)).parameters)
            for keywords in _call_keywords(tree, name):
                assert keywords <= accepted, f"{path.name}: {name} takes no {sorted(keywords - accepted)}"
        read = {
            node.attr
            for node in ast.walk(tree)
            if isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id == "result"
        }
        assert read and read <= result_fields, (
            f"{path.name}: CompileResult has no {sorted(read - result_fields)}"
        )


def test_the_readme_is_short():
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move depth into docs/"
    first_block = lines.index("```") + 1  # the two commands open the first code block, as they always have
    assert lines[first_block : first_block + 2] == [
        "make demo     # sets up .venv, runs the whole OHQ pipeline on a generated CNN on this machine's "
        "host board",
        "make test     # installs the dev extras and runs the test suite",
    ]


def heading_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation but ``-`` and ``_`` dropped,
    spaces as ``-`` (code blocks hold no headings)."""
    text = re.sub(r"```.*?```", "", markdown, flags=re.S)
    return {
        re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        for heading in re.findall(r"^#+ (.+)$", text, flags=re.M)
    }


def relative_links(markdown: str) -> list[str]:
    text = re.sub(r"```.*?```", "", markdown, flags=re.S)
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    return [target for target in targets if not re.match(r"[a-z]+:", target)]


def test_relative_links_resolve():
    broken = []
    for page in documents():
        for target in relative_links(page.read_text()):
            file_part, _, anchor = target.partition("#")
            linked = (page.parent / file_part).resolve() if file_part else page
            if not linked.exists():
                broken.append(f"{page.name}: {target} (no such file)")
            elif anchor and linked.suffix == ".md" and anchor not in heading_anchors(linked.read_text()):
                broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, broken


def test_the_link_checks_catch_a_broken_link():
    page = "# Title\n\n## The whole pipeline: `compile --budget`\n\n[a](#the-whole-pipeline-compile---budget)"
    assert heading_anchors(page) == {"title", "the-whole-pipeline-compile---budget"}
    assert relative_links(page + " [b](https://x.org) [c](docs/cli.md#tuning)\n```\n[d](no.md)\n```") == [
        "#the-whole-pipeline-compile---budget",
        "docs/cli.md#tuning",
    ]
