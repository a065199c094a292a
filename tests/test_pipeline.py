"""`compile_model` end to end on the loopback host board, and its verification failure path."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ohq_tvm import models
from ohq_tvm.budget import BudgetSpec
from ohq_tvm.codegen import ExportedModule
from ohq_tvm.codegen import verify as verify_module
from ohq_tvm.errors import VerificationError
from ohq_tvm.frontend import load_onnx
from ohq_tvm.layers import quantizable_layers
from ohq_tvm.oqa.in_model import SCALE_BOUNDS, SPREAD_BOUND
from ohq_tvm.pipeline import CompileResult, _finish, compile_model
from ohq_tvm.plan import Plan, PlanError
from ohq_tvm.targets import resolve_target

from testing_support import (
    made_up_planning,
    new_tvm_exec_processes,
    planned_on_unreliable_timing,
    tvm_exec_processes,
)


def test_compile_tiny_cnn_on_the_host_board(tmp_path):
    before = tvm_exec_processes()
    messages: list[str] = []
    result = compile_model(models.tiny_cnn(), "host", tmp_path / "out", progress=messages.append)
    assert result.verified
    assert result.library_path.is_file()
    manifest = json.loads(result.manifest_path.read_text())
    verification = manifest["verification"]
    assert verification["passed"] is True
    assert verification["outputs"][0]["relative_error"] <= 1e-4
    latency = verification["latency"]
    assert latency["median_ms"] > 0
    # Its spread, and whether it is past the bound that calls it noisy (the CLI then warns).
    median_ms = float(np.median(latency["repeats_ms"]))
    assert latency["iqr_percent"] == pytest.approx(100 * latency["iqr_ms"] / median_ms)
    assert latency["noisy"] is (latency["iqr_percent"] > 10.0)
    assert latency["noisy_above_iqr_percent"] == 10.0
    assert set(manifest["stage_seconds"]) == {"import", "build", "export", "verify"}
    assert any("matches ONNX Runtime" in m for m in messages)
    # The loopback tracker and server were started for this call and are gone again.
    assert not new_tvm_exec_processes(before)


def test_cross_target_without_a_board_is_exported_but_not_verified(tmp_path):
    result = compile_model(models.MODELS["conv"](), "rpi4b", tmp_path)
    assert result.verification is None
    assert "--tracker" in result.skipped_verification
    manifest = json.loads(result.manifest_path.read_text())
    assert manifest["library"]["elf_machine"] == "aarch64"
    assert manifest["verification"] == {"skipped": result.skipped_verification}


def test_disagreeing_outputs_fail_verification_and_say_so(tmp_path, monkeypatch):
    real = verify_module.reference_outputs

    def skewed(imported, inputs, reference=None, fused=True):
        return [out + np.float32(0.5) for out in real(imported, inputs, reference, fused)]

    monkeypatch.setattr(verify_module, "reference_outputs", skewed)
    with pytest.raises(VerificationError, match="DISAGREES with ONNX Runtime"):
        compile_model(models.MODELS["conv"](), "host", tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["verification"]["passed"] is False
    assert manifest["verification"]["outputs"][0]["max_abs_error"] == pytest.approx(0.5, rel=1e-3)


def test_plan_made_for_another_model_is_refused(tmp_path):
    layers = quantizable_layers(load_onnx(models.tiny_cnn()).mod)
    plan = Plan.uniform(layers, "fp32", model_sha256="0" * 64)
    with pytest.raises(PlanError, match="another model"):
        compile_model(models.tiny_cnn(), "host", tmp_path, plan=plan)
    with pytest.raises(PlanError, match="one of a precision, a plan or a budget"):
        compile_model(models.tiny_cnn(), "host", tmp_path, plan=plan, precision="int8")


@pytest.mark.parametrize("unreliable", [False, True])
def test_the_manifest_says_when_the_plan_was_chosen_from_contradicting_timings(tmp_path, unreliable):
    planning = made_up_planning()
    if unreliable:
        planning = planned_on_unreliable_timing(planning)
    exported = ExportedModule(tmp_path / "model.so", tmp_path / "manifest.json", toolchain=None)
    result = CompileResult(
        tmp_path,
        exported.library_path,
        exported.manifest_path,
        resolve_target("host"),
        planning.measurement.imported,
        verification=None,
        skipped_verification="verification disabled",
        planning=planning,
    )
    _finish(result, exported, BudgetSpec.parse("latency=1.1*int8"), 0, lambda message: None)
    section = json.loads(exported.manifest_path.read_text())["planning"]
    assert section["timing_unreliable"] == result.timing_unreliable == planning.timing_unreliable
    if not unreliable:  # the parts as measured alone: nothing was checked
        assert section["timing_unreliable"] is None and section["timing_check"] is None
        return
    in_model = planning.measurement.in_model
    assert section["timing_unreliable"].startswith("the board's timings contradict each other: uniform int8:")
    assert section["timing_check"] == {
        "bounds": {"scale": list(SCALE_BOUNDS), "spread_of_median": SPREAD_BOUND},
        "retimed_because": list(in_model.retimed_because),
        "retimed_parts": 1,
        "unreliable": list(in_model.unreliable),
        "marked_rows": 12,
    }
    assert section["in_model"]["int8"]["clamped"] is True
    assert f"**Timing unreliable**: {planning.timing_unreliable}" in (tmp_path / "report.md").read_text()
