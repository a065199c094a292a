"""``report.md``: what ``ohq-tvm compile --budget`` decided, why, and how the prediction held up.

Reads the :class:`~ohq_tvm.planner.PlanningResult` of the planning stage (the chosen plan, its
baselines, the board's latencies, MQE's sensitivities) and what later stages measured (end-to-end latency,
output fidelity, verification, stage times), and writes them as one markdown file: the plans side by side,
predicted against measured totals, and one row per layer with every number the solver saw. The Pareto
plot beside it is :func:`~ohq_tvm.pareto_plot.plot_pareto`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from .jsonfile import write_atomic
from .pareto_plot import plot_pareto
from .precision import Precision

if TYPE_CHECKING:  # the planner imports TVM; a report needs only the objects it produced
    from .budget import Budgets
    from .plan import Plan
    from .planner import PlanningResult

PREDICTED_MARK = "~"  # a latency the latency model predicted instead of the board measuring it

# A chosen plan measured whole further than this from its prediction is reported: planning rested on
# numbers the board does not bear out (benchmarks/results/oqa_composition.md gives the usual error).
PREDICTION_BOUND = 0.15


def prediction_miss(predicted_ms: float | None, measured_ms: float | None) -> str | None:
    """One sentence when a plan measured whole is more than :data:`PREDICTION_BOUND` off its predicted
    latency (``None`` when it is within, or either number is missing)."""
    if not predicted_ms or measured_ms is None:
        return None
    error = measured_ms / predicted_ms - 1
    if abs(error) <= PREDICTION_BOUND:
        return None
    direction = "slower" if error > 0 else "faster"
    return (
        f"the chosen plan measures {measured_ms:.3f} ms whole, {abs(error) * 100:.0f}% {direction} than the "
        f"{predicted_ms:.3f} ms predicted (bound {PREDICTION_BOUND * 100:.0f}%): the plan was chosen on "
        "numbers the whole model does not bear out; compile again on a quiet board, and if it persists, "
        "this model's operators timed alone do not add up to it"
    )


def write_report(
    path: str | os.PathLike,
    planning: PlanningResult,
    *,
    model_label: str,
    board_label: str,
    budget: str,
    measured_ms: float | None = None,
    measured_latency: Mapping | None = None,
    fidelity: Mapping[str, Mapping[str, float]] | None = None,
    verification: str | None = None,
    stage_seconds: Mapping[str, float] | None = None,
    extra_plans: Mapping[str, Plan] | None = None,
) -> Path:
    """Write the markdown report of one planned compile to ``path`` (parent folders created); return it.

    ``budget`` is the budget as the user gave it (e.g. ``"latency-ratio=0.6"``); ``measured_ms`` the
    chosen plan's end-to-end latency on the board, ``measured_latency`` that timing in full (the JSON of
    :class:`~ohq_tvm.board.LatencyStats`: its spread is reported, with a warning when it is noisy);
    ``fidelity[source][metric]`` how the compiled output
    agreed with float32 on each data source (e.g. ``{"synthetic": {"top1_agreement": 0.97}}``);
    ``verification`` the verification's one-line summary; ``extra_plans`` more plans for the summary
    table (a missing ``predicted`` value shows as ``-``). Whatever is ``None`` is reported as not
    measured. Raises :class:`~ohq_tvm.errors.OHQError` if the file cannot be written.
    """
    sections = [
        _header(planning, model_label, board_label, budget),
        _plans_section(planning, extra_plans or {}),
        _totals_section(planning, measured_ms, measured_latency),
        _fidelity_section(fidelity),
        f"## Verification\n\n{verification or 'not run'}\n",
        _stages_section(stage_seconds),
        _layers_section(planning),
    ]
    return write_atomic(path, "\n".join(sections), "report")


# -- formatting ----------------------------------------------------------------------------------------
def _cell(text: object) -> str:
    return str(text).replace("|", "\\|")


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _loss(value: float | None) -> str:
    return "-" if value is None else f"{value:.3e}"


def _number(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:.6g}"


def _shape(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape)) or "scalar"


# -- sections ------------------------------------------------------------------------------------------
def _budgets_text(budgets: Budgets) -> str:
    parts = []
    if budgets.latency_ms is not None:
        parts.append(f"latency ≤ {budgets.latency_ms:.4f} ms")
    if budgets.size_bytes is not None:
        parts.append(f"weights ≤ {budgets.size_bytes / 1e6:.3f} MB")
    if budgets.memory_bytes is not None:
        parts.append(f"peak layer memory ≤ {budgets.memory_bytes / 1e6:.3f} MB")
    if budgets.bops is not None:
        parts.append(f"bit-operations ≤ {budgets.bops:.4g}")
    if budgets.sensitivity is not None:
        parts.append(f"estimated loss ≤ {budgets.sensitivity:.3e}")
    return ", ".join(parts) or "none"


def _header(planning: PlanningResult, model_label: str, board_label: str, budget: str) -> str:
    measurement, sensitivity = planning.measurement, planning.sensitivity
    summary = measurement.summary
    predicted = ""
    if summary.predicted_ms:
        error = f"{summary.model_mape_percent:.1f}%" if summary.model_mape_percent is not None else "n/a"
        predicted = f", {len(summary.predicted_ms)} predicted by the latency model (MAPE {error})"
    calibration = f", {sensitivity.calibration} calibration" if sensitivity.calibration else ""
    # A planner that reuses a cached estimate says so; its passes and seconds are the original run's.
    reused = " (reused from the cache)" if getattr(planning, "sensitivity_reused", False) else ""
    lines = [
        f"# OHQ report: {model_label} on {board_label}",
        "",
        f"- **Budget**: `{budget}` → the solver's budgets: {_budgets_text(planning.budgets)}",
        f"- **Chosen plan**: {planning.plan.counts_text()} (source: {planning.plan.source})",
        f"- **Board**: {summary.board} `{summary.fingerprint}`, schedule `{summary.schedule}`",
        f"- **Operators (OQA)**: {summary.total} unique: {summary.measured} measured now, "
        f"{summary.reused} reused from the database, {len(summary.failed)} failed{predicted}",
        f"- **Measurement database**: `{measurement.database_path}`",
        *_timing_lines(planning),
        f"- **Sensitivity (MQE)**: {sensitivity.forward_passes} forward passes in "
        f"{sensitivity.seconds:.1f} s on {sensitivity.board}, data `{sensitivity.data}`, "
        f"{sensitivity.batches} batches{calibration}{reused}",
        "",
    ]
    return "\n".join(lines)


def _timing_lines(planning: PlanningResult) -> list[str]:
    """The reliability of the board's timings, when the uniform plans were timed whole."""
    in_model = planning.measurement.in_model
    if in_model is None:
        return []
    unreliable = in_model.unreliable_text()
    if unreliable:
        return [f"- **Timing unreliable**: {unreliable}"]
    if in_model.retimed_because:
        again = f"{in_model.retimed_parts} part(s) and " if in_model.retimed_parts else ""
        return [
            f"- **Timing**: reliable after timing {again}the uniform plans whole again "
            f"({'; '.join(in_model.retimed_because)})"
        ]
    return ["- **Timing**: reliable (the uniform plans timed whole agree with their parts)"]


def _plan_row(name: str, plan: Plan, fp32_ms: float | None) -> list[str]:
    p = plan.predicted
    latency = p.get("latency_ms")
    size = p.get("size_bytes")
    speedup = f"{fp32_ms / latency:.2f}x" if fp32_ms and latency else "-"
    return [
        name,
        plan.source,
        _ms(latency),
        speedup,
        "-" if size is None else f"{size / 1e6:.3f}",
        _loss(p.get("sensitivity")),
        plan.counts_text(compact=True),
    ]


def _plans_section(planning: PlanningResult, extra_plans: Mapping[str, Plan]) -> str:
    fp32 = planning.baselines.get("fp32")
    fp32_ms = fp32.predicted.get("latency_ms") if fp32 is not None else None
    named = {"**chosen**": planning.plan, **planning.baselines, **extra_plans}
    rows = [_plan_row(name, plan, fp32_ms) for name, plan in named.items()]
    header = [
        "plan",
        "source",
        "predicted latency ms",
        "vs fp32",
        "weights MB",
        "est. loss (Σ KL)",
        "precisions",
    ]
    text = "## Plans\n\n" + _table(header, rows)
    if planning.frontier:
        text += (
            f"\nPareto frontier: {len(planning.frontier)} plans from "
            f"{_ms(planning.frontier[0].predicted['latency_ms'])} to "
            f"{_ms(planning.frontier[-1].predicted['latency_ms'])} ms.\n"
        )
    return text


def _totals_section(
    planning: PlanningResult, measured_ms: float | None, measured_latency: Mapping | None = None
) -> str:
    predicted_ms = planning.plan.predicted.get("latency_ms")
    if measured_ms is None:
        measured, ratio = "not measured", "-"
    else:
        measured = _ms(measured_ms)
        ratio = f"{measured_ms / predicted_ms:.3f}" if predicted_ms else "-"
    rows = [
        ["chosen plan, predicted (Σ operators + conversions + glue)", _ms(predicted_ms)],
        ["chosen plan, measured end to end on the board", measured],
        ["measured / predicted", ratio],
    ]
    noise = ""
    if measured_latency is not None:
        iqr_ms, percent = measured_latency["iqr_ms"], measured_latency["iqr_percent"]
        repeats = len(measured_latency["repeats_ms"])
        spread = f"{_ms(iqr_ms)} ({percent:.1f}% of the median, {repeats} repeats)"
        rows.insert(2, ["measured, spread between repeats (IQR)", spread])
        if measured_latency["noisy"]:
            bound = measured_latency["noisy_above_iqr_percent"]
            noise = (
                f"\n**Warning: the measured latency is noisy** (IQR above {bound:.0f}% of the median): the "
                "board was likely busy or in a slow spell, so the measured total and its ratio to the "
                "prediction may be off; compile again on a quiet board.\n"
            )
    miss = prediction_miss(predicted_ms, measured_ms)
    if miss is not None:
        noise += f"\n**Warning: {miss}.**\n"
    in_model = planning.measurement.in_model
    if in_model is None:
        note = "Predicted from the operators as measured alone."
    else:
        note = (
            "Each layer's latency is scaled by its precision's in-model factor, so that the uniform plans "
            f"predict what they measure built whole on the board: {in_model.describe()}. The layer "
            "table below shows the operators as measured alone."
        )
    return "## Totals: predicted vs measured\n\n" + _table(["", "latency ms"], rows) + noise + f"\n{note}\n"


def _fidelity_section(fidelity: Mapping[str, Mapping[str, float]] | None) -> str:
    if not fidelity:
        return "## Fidelity against float32\n\nnot measured\n"
    metrics = list(dict.fromkeys(metric for values in fidelity.values() for metric in values))
    rows = [
        [source, *(_number(values[m]) if m in values else "-" for m in metrics)]
        for source, values in fidelity.items()
    ]
    return "## Fidelity against float32\n\n" + _table(["data", *metrics], rows)


def _stages_section(stage_seconds: Mapping[str, float] | None) -> str:
    if not stage_seconds:
        return "## Stage times\n\nnot recorded\n"
    rows = [[stage, f"{seconds:.1f}"] for stage, seconds in stage_seconds.items()]
    rows.append(["**total**", f"{sum(stage_seconds.values()):.1f}"])
    return "## Stage times\n\n" + _table(["stage", "seconds"], rows)


def _layers_section(planning: PlanningResult) -> str:
    measurement, plan = planning.measurement, planning.plan
    workloads = measurement.workloads
    rows = measurement.layer_table()
    present = {p for options in workloads.layers.values() for p in options}
    columns = [p for p in Precision if p in present]
    lower = [p for p in columns if p is not Precision.FP32]
    header = [
        "layer",
        "ONNX name",
        "op",
        "input → output",
        "chosen",
        *[f"{p} ms" for p in columns],
        "quantize ms",
        "dequantize ms",
        *[f"KL {p}" for p in lower],
    ]
    table = []
    for row in rows:
        layer_id = row["layer"]
        info = workloads.infos[layer_id]
        chosen = plan.assignments.get(layer_id)
        latencies = []
        for precision in columns:
            if precision.value not in row["latency_ms"]:
                latencies.append("")
                continue
            mark = PREDICTED_MARK if precision.value in row["predicted"] else ""
            text = mark + _ms(row["latency_ms"][precision.value])
            latencies.append(f"**{text}**" if precision is chosen else text)
        losses = planning.sensitivity.values.get(layer_id, {})
        table.append(
            [
                layer_id,
                info.onnx_name or "-",
                row["op"],
                f"{_shape(info.input_shape)} → {_shape(info.output_shape)}",
                chosen.value if chosen is not None else "-",
                *latencies,
                _ms(row["quantize_ms"]),
                _ms(row["dequantize_ms"]),
                *[_loss(losses.get(p)) for p in lower],
            ]
        )
    notes = [
        f"Bold: the chosen precision's latency. Glue (always fp32): {measurement.glue_ms():.4f} ms over "
        f"{len(workloads.glue)} operators. Quantize/dequantize are paid only at a float/integer boundary."
    ]
    if measurement.summary.predicted_ms:
        notes.append(
            f"{PREDICTED_MARK}: predicted by the latency model, not measured on the board "
            "(measure without a budget to time them)."
        )
    return "## Layers\n\n" + _table(header, table) + "\n" + "\n".join(notes) + "\n"


__all__ = ["PREDICTED_MARK", "PREDICTION_BOUND", "plot_pareto", "prediction_miss", "write_report"]
