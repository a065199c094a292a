"""report.md and pareto.png from a real planning result: tiny_cnn's workloads, made-up board numbers,
the real solver. The report must show exactly the numbers the solver saw."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ohq_tvm import Precision
from ohq_tvm.board import LatencyStats
from ohq_tvm.plan import Plan
from ohq_tvm.planner import PlanningResult
from ohq_tvm.report import plot_pareto, prediction_miss, write_report

from testing_support import (
    DEQUANTIZE_MS,
    GLUE_MS,
    LAYERS,
    PREDICTED_LAYER,
    QUANTIZE_MS,
    made_up_planning,
    planned_on_unreliable_timing,
)

FIDELITY = {
    "synthetic": {"top1_agreement": 0.96875, "cosine": 0.999871, "samples": 32},
    "images": {"top1_agreement": 0.9, "kl": 0.00123},
}
STAGES = {"import": 0.4, "measure": 12.3, "plan": 3.5, "build": 6.0}


@pytest.fixture(scope="module")
def planning() -> PlanningResult:
    return made_up_planning()


def _section(text: str, title: str) -> str:
    return text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def _rows(section: str) -> list[list[str]]:
    """The body rows of the first markdown table in ``section``, as stripped cells."""
    lines = [line for line in section.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split(" | ")] for line in lines[2:]]


def _report(tmp_path, planning, **extra) -> str:
    options = {"model_label": "tiny_cnn", "board_label": "host", "budget": "latency-ratio=0.8"}
    path = write_report(tmp_path / "out" / "report.md", planning, **options, **extra)
    assert path == tmp_path / "out" / "report.md"
    return path.read_text()


def test_layer_table_shows_the_chosen_precision_and_every_number_the_solver_saw(tmp_path, planning):
    text = _report(tmp_path, planning)
    plan = planning.plan
    rows = _rows(_section(text, "Layers"))
    assert [row[0] for row in rows] == list(LAYERS)
    counts = plan.counts()
    assert 0 < counts.get("int8", 0) < len(LAYERS)  # the budget forces a real mix
    for row in rows:
        layer_id, onnx_name, op, shapes, chosen, fp32, int8, quantize, dequantize, kl = row
        info = planning.measurement.workloads.infos[layer_id]
        assert (onnx_name, op) == (info.onnx_name, info.op)
        assert shapes == "x".join(map(str, info.input_shape)) + " → " + "x".join(map(str, info.output_shape))
        assert chosen == plan.assignments[layer_id].value
        fp32_ms, int8_ms, loss = LAYERS[layer_id]
        mark = "~" if layer_id == PREDICTED_LAYER else ""
        expected = {"fp32": f"{fp32_ms:.4f}", "int8": f"{mark}{int8_ms:.4f}"}
        expected[chosen] = f"**{expected[chosen]}**"
        assert (fp32, int8) == (expected["fp32"], expected["int8"])
        assert (quantize, dequantize) == (f"{QUANTIZE_MS:.4f}", f"{DEQUANTIZE_MS:.4f}")
        assert float(kl) == pytest.approx(loss, rel=1e-3)
    assert "~: predicted by the latency model" in text
    glue = len(planning.measurement.workloads.glue)
    assert f"Glue (always fp32): {glue * GLUE_MS:.4f} ms over {glue} operators" in text


def test_summary_lists_every_plan_with_its_predicted_totals(tmp_path, planning):
    extra = Plan(dict.fromkeys(LAYERS, Precision.FP32), source="manual")
    text = _report(tmp_path, planning, extra_plans={"hand-made": extra})
    rows = {row[0]: row for row in _rows(_section(text, "Plans"))}
    assert list(rows) == ["**chosen**", "fp32", "int8", "greedy", "bops-proxy", "hand-made"]
    # fp32's prediction is the sum of the numbers supplied: every layer in fp32 plus the glue.
    fp32_ms = sum(fp32 for fp32, _, _ in LAYERS.values()) + len(planning.measurement.workloads.glue) * GLUE_MS
    assert rows["fp32"][1:] == ["uniform", f"{fp32_ms:.4f}", "1.00x", rows["fp32"][4], "0.000e+00", "7xfp32"]
    chosen = planning.plan.predicted
    assert rows["**chosen**"][2] == f"{chosen['latency_ms']:.4f}"
    assert rows["**chosen**"][3] == f"{fp32_ms / chosen['latency_ms']:.2f}x"
    assert rows["**chosen**"][5] == f"{chosen['sensitivity']:.3e}"
    int8_loss = sum(kl for _, _, kl in LAYERS.values())
    assert float(rows["int8"][5]) == pytest.approx(int8_loss, rel=1e-3)
    assert rows["int8"][6] == "7xint8"
    assert rows["hand-made"][1:3] == ["manual", "-"]  # no prediction was attached to it
    assert "Pareto frontier: " in text


def test_totals_fidelity_verification_and_stages(tmp_path, planning):
    predicted_ms = planning.plan.predicted["latency_ms"]
    text = _report(
        tmp_path,
        planning,
        measured_ms=1.25 * predicted_ms,
        fidelity=FIDELITY,
        verification="output matches ONNX Runtime (worst relative error 1.2e-03)",
        stage_seconds=STAGES,
    )
    totals = [row[1] for row in _rows(_section(text, "Totals: predicted vs measured"))]
    assert totals == [f"{predicted_ms:.4f}", f"{1.25 * predicted_ms:.4f}", "1.250"]
    fidelity = _section(text, "Fidelity against float32")
    assert "| data | top1_agreement | cosine | samples | kl |" in fidelity
    assert _rows(fidelity) == [
        ["synthetic", "0.96875", "0.999871", "32", "-"],
        ["images", "0.9", "-", "-", "0.00123"],
    ]
    assert "output matches ONNX Runtime (worst relative error 1.2e-03)" in _section(text, "Verification")
    stages = _rows(_section(text, "Stage times"))
    assert stages[-1] == ["**total**", "22.2"]
    assert stages[1] == ["measure", "12.3"]


@pytest.mark.parametrize(
    "repeats_ms, spread, noisy",
    [
        ((6.0, 6.05, 6.1, 6.1, 6.2), "0.0500 (0.8% of the median, 5 repeats)", False),
        ((6.0, 6.1, 6.2, 7.5, 8.0), "1.4000 (22.6% of the median, 5 repeats)", True),
    ],
)
def test_the_measured_latency_s_spread_and_a_noise_warning(tmp_path, planning, repeats_ms, spread, noisy):
    latency = LatencyStats(repeats_ms)
    text = _report(tmp_path, planning, measured_ms=latency.median_ms, measured_latency=latency.to_json())
    totals = _section(text, "Totals: predicted vs measured")
    rows = {row[0]: row[1] for row in _rows(totals)}
    assert rows["measured, spread between repeats (IQR)"] == spread
    assert rows["chosen plan, measured end to end on the board"] == f"{latency.median_ms:.4f}"
    warning = "**Warning: the measured latency is noisy** (IQR above 10% of the median)"
    assert (warning in totals) is noisy


@pytest.mark.parametrize("ratio, warned", [(1.25, "25% slower"), (0.8, "20% faster"), (1.1, None)])
def test_a_plan_measuring_far_from_its_prediction_is_a_warning(tmp_path, planning, ratio, warned):
    predicted_ms = planning.plan.predicted["latency_ms"]
    totals = _section(
        _report(tmp_path, planning, measured_ms=ratio * predicted_ms), "Totals: predicted vs measured"
    )
    miss = prediction_miss(predicted_ms, ratio * predicted_ms)
    if warned is None:
        assert miss is None and "Warning" not in totals
    else:
        assert warned in miss and f"**Warning: {miss}.**" in totals
    assert prediction_miss(predicted_ms, None) is None and prediction_miss(None, 1.0) is None


def test_header_names_budgets_board_database_and_mqe(tmp_path, planning):
    header = _report(tmp_path, planning).split("\n## ", 1)[0]
    assert header.startswith("# OHQ report: tiny_cnn on host\n")
    assert (
        f"`latency-ratio=0.8` → the solver's budgets: latency ≤ {planning.budgets.latency_ms:.4f} ms"
        in header
    )
    assert "host-loopback `0123456789abcdef`, schedule `default/r2`" in header
    assert "31 unique: 10 measured now, 20 reused from the database, 0 failed, 1 predicted" in header
    assert "(MAPE 12.5%)" in header
    assert "`/tmp/ohq/measurements.sqlite`" in header
    assert "32 forward passes in 2.5 s on host, data `synthetic:gaussian`, 4 batches" in header


def test_a_plan_chosen_from_contradicting_timings_says_so_in_the_header(tmp_path, planning):
    assert "Timing unreliable" not in _report(tmp_path, planning)  # parts alone: nothing to check
    unreliable = planned_on_unreliable_timing(planning)
    header = _report(tmp_path, unreliable).split("\n## ", 1)[0]
    (line,) = [line for line in header.splitlines() if "Timing" in line]
    int8 = unreliable.measurement.in_model.runs[Precision.INT8]
    assert line == f"- **Timing unreliable**: {unreliable.timing_unreliable}"
    assert (
        f"uniform int8: its parts add up to {int8.parts_ms:.3g} ms, 10x the {int8.measured_ms:.3g} ms" in line
    )
    assert "after timing 1 part(s) and the uniform plans whole again" in line
    assert "12 row(s) measured in this run are marked to be timed again" in line


def test_what_was_not_measured_says_so(tmp_path, planning):
    text = _report(tmp_path, planning)
    totals = _rows(_section(text, "Totals: predicted vs measured"))
    assert [row[1] for row in totals[1:]] == ["not measured", "-"]
    assert _section(text, "Fidelity against float32").strip() == "not measured"
    assert _section(text, "Verification").strip() == "not run"
    assert _section(text, "Stage times").strip() == "not recorded"


@pytest.mark.parametrize("measured", [True, False])
def test_pareto_png(tmp_path, planning, measured):
    from matplotlib.image import imread

    measured_ms = 1.1 * planning.plan.predicted["latency_ms"] if measured else None
    path = plot_pareto(tmp_path / "plots" / "pareto.png", planning, measured_ms=measured_ms, title="tiny_cnn")
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(data) > 10_000  # markers, labels and a legend, not a blank canvas
    pixels = imread(path)
    assert pixels.shape == (600, 960, 4)
    assert pixels[..., :3].std() > 0.05


def test_importing_the_report_loads_neither_matplotlib_nor_tvm():
    code = "import sys, ohq_tvm.report; print(sorted({'matplotlib', 'tvm'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
