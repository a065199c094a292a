"""``ohq-tvm compile --budget``: the whole pipeline in one command, its outputs, resuming, failing."""

from __future__ import annotations

import itertools
import json
import math
import signal
import sqlite3
import subprocess
import time

import psutil
import pytest

from ohq_tvm import models
from ohq_tvm.frontend import load_onnx
from ohq_tvm.layers import quantizable_layers
from ohq_tvm.plan import Plan
from ohq_tvm.precision import Precision

from testing_support import OHQ_TVM, assert_one_line_error, ohq

CANDIDATES = ["--precisions", "fp32,int8", "--batches", "1", "--fidelity-samples", "4"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """tiny_cnn and a measurement database that the module's tests share (and fill once)."""
    root = tmp_path_factory.mktemp("budget")
    return models.save(models.tiny_cnn(), root / "tiny.onnx"), root / "oqa.sqlite"


def _measurements(db) -> int:
    if not db.exists():
        return 0
    with sqlite3.connect(db) as connection:
        try:
            return connection.execute("SELECT COUNT(*) FROM measurements").fetchone()[0]
        except sqlite3.OperationalError:  # tables not created yet
            return 0


@pytest.mark.slow  # about a minute on a 2-core host: `make test-slow`
def test_an_interrupted_run_keeps_its_measurements_and_the_rerun_resumes(tiny, tmp_path):
    model, db = tiny
    args = ["compile", str(model), "--db", str(db), *CANDIDATES, "--budget", "size=0.5*fp32"]
    proc = subprocess.Popen(
        [str(OHQ_TVM), *args, "-o", str(tmp_path / "a")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while _measurements(db) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    board_processes = psutil.Process(proc.pid).children(recursive=True)  # the loopback tracker/server
    assert board_processes
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr
    kept = _measurements(db)
    assert 3 <= kept < 31  # tiny_cnn has 31 unique workloads at fp32/int8
    _, alive = psutil.wait_procs(board_processes, timeout=10)
    assert not alive  # the loopback board went down with it
    assert not (tmp_path / "a" / "model.so").exists()

    rerun = ohq(*args, "-o", str(tmp_path / "a"))
    assert rerun.returncode == 0, rerun.stderr
    assert f"operators: {31 - kept} measured now, {kept} from the database" in rerun.stdout


def test_budget_compile_writes_module_plan_report_and_plot(tiny, tmp_path):
    model, db = tiny
    out = tmp_path / "out"
    proc = ohq(
        "compile", str(model), "--db", str(db), *CANDIDATES, "--budget", "size=0.5*fp32", "-o", str(out)
    )
    assert proc.returncode == 0, proc.stderr
    assert "ran on host" in proc.stdout and "QDQ export" in proc.stdout
    plan = Plan.load(out / "plan.json")
    manifest = json.loads((out / "manifest.json").read_text())
    planning = manifest["planning"]
    assert plan.source == "ilp" and "int8" in plan.counts()
    assert planning["budget"] == "size=0.5*fp32"
    assert plan.predicted["size_bytes"] <= planning["budgets"]["size_bytes"] + 1e-6
    assert planning["measured_ms"] == manifest["verification"]["latency"]["median_ms"] > 0
    assert set(manifest["fidelity"]) == {"synthetic"} and manifest["fidelity"]["synthetic"]["samples"] == 4
    assert 0.0 <= manifest["fidelity"]["synthetic"]["top1_agreement"] <= 1.0
    report = (out / "report.md").read_text()
    for layer_id, precision in plan.assignments.items():
        row = next(line for line in report.splitlines() if line.startswith(f"| {layer_id} |"))
        assert f"| {precision.value} |" in row
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    frontier = json.loads((out / "frontier.json").read_text())
    # The frontier's points trade latency for loss: slower ones are more accurate (none dominates another).
    points = sorted((p["predicted"]["latency_ms"], p["predicted"]["sensitivity"]) for p in frontier)
    assert points and all(b[1] < a[1] for a, b in itertools.pairwise(points))
    assert (out / "sensitivity.json").is_file() and (out / "model.qdq.onnx").is_file()
    # The uniform plans were timed whole: the report says how they scale the layers.
    assert set(planning["in_model"]) == {"fp32", "int8"}
    assert all(run["measured_ms"] > 0 for run in planning["in_model"].values())
    assert "in-model factor" in report and "int8 x" in report

    # A new budget re-solves from the database and the cached sensitivity: nothing measured again,
    # unless this busy machine's timings contradicted each other: then what they measured is timed again.
    again = ohq(
        "compile", str(model), "--db", str(db), *CANDIDATES, "--budget", "pareto=6", "-o", str(tmp_path / "b")
    )
    assert again.returncode == 0, again.stderr
    assert "sensitivity: reused" in again.stdout
    assert "uniform int8:" in again.stdout
    if planning["timing_unreliable"] is None:
        assert "operators: 0 measured now, 31 from the database" in again.stdout
        assert "(stored)" in again.stdout
    else:
        assert "verified, planned on unreliable timings" in proc.stdout
        assert "\nwarning: the board's timings contradict each other" in proc.stdout
        assert "operators: 0 measured now" not in again.stdout and "(stored)" not in again.stdout
    knee = Plan.load(tmp_path / "b" / "plan.json")
    assert knee.source == "ilp-knee"
    assert knee.assignments in [
        Plan.from_json(p).assignments for p in json.loads((tmp_path / "b" / "frontier.json").read_text())
    ]

    # A peak-memory budget, relative to the fp32 plan's largest layer working set.
    layers = quantizable_layers(load_onnx(model).mod)
    fp32_peak = max(
        info.weight_bytes(Precision.FP32) + 4 * (math.prod(info.input_shape) + math.prod(info.output_shape))
        for info in layers
    )
    lean = ohq(
        "plan",
        str(model),
        "--db",
        str(db),
        *CANDIDATES[:4],
        "--budget",
        "memory=0.5*fp32",
        "--parts-only",
        "-o",
        str(tmp_path / "lean.json"),
    )
    assert lean.returncode == 0, lean.stderr
    assert "uniform int8:" not in lean.stdout
    lean_plan = Plan.load(tmp_path / "lean.json")
    assert 0 < lean_plan.predicted["memory_bytes"] <= 0.5 * fp32_peak + 1e-6
    assert "int8" in lean_plan.counts()


@pytest.mark.slow  # about a minute on a 2-core host: `make test-slow`
def test_budget_errors_are_one_line(tiny, tmp_path):
    model, db = tiny
    common = ["compile", str(model), "--db", str(db), *CANDIDATES, "-o", str(tmp_path)]
    assert_one_line_error(ohq(*common, "--budget", "latency=fast"), "'fast' is not a plan")
    assert_one_line_error(ohq(*common, "--budget", "latency=0.01*int8"), "smallest any plan reaches")
    assert_one_line_error(ohq(*common, "--budget", "memory=1KB"), "peak memory budget")
    # Candidates of another architecture cannot be timed here: say where the board must come from.
    cross = ohq("compile", str(model), "--target", "rpi4b", "--budget", "latency=int8", "-o", str(tmp_path))
    assert_one_line_error(cross, "--tracker")


@pytest.mark.slow  # about a minute on a 2-core host: `make test-slow`
def test_low_agreement_with_fp32_fails_verification(tmp_path):
    # A narrow MobileNetV2 with random weights: int8 flips some of its 100-way arg-maxes.
    model = models.save(models.mobilenet_v2(size=32, width=0.35, classes=100), tmp_path / "m.onnx")
    out = tmp_path / "out"
    proc = ohq(
        "compile",
        str(model),
        "--precision",
        "int8",
        "--fidelity-samples",
        "32",
        "--min-agreement",
        "0.99",
        "-o",
        str(out),
    )
    assert proc.returncode == 3, proc.stderr
    assert "FAILED verification" in proc.stderr and "top-1 agreement with fp32" in proc.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    agreement = manifest["fidelity"]["synthetic"]["top1_agreement"]
    assert agreement < 0.99
    assert manifest["verification"]["passed"] is True  # the arithmetic matches the QDQ twin ...
    assert manifest["verification"]["failures"] == [
        f"top-1 agreement with fp32 on synthetic {agreement:.3f} is below the required 0.99"
    ]  # ... the plan's accuracy is what fails
