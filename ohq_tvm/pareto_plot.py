"""``pareto.png``: predicted latency against estimated loss for the chosen plan, its baselines and the
frontier, with the chosen plan's measured latency beside its prediction.

matplotlib is imported when a plot is drawn (through its object API and the Agg canvas: no pyplot, no
display, no global state), so importing :mod:`ohq_tvm` stays fast.
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

from .jsonfile import write_atomic

if TYPE_CHECKING:
    from .plan import Plan
    from .planner import PlanningResult

FIGURE_SIZE_INCHES = (8.0, 5.0)
DPI = 120  # 960 x 600 pixels
# The y axis turns symmetric-log when the plotted losses span more than this factor (fp32's loss is 0,
# which a log axis cannot show; symlog is linear below its threshold and logarithmic above).
_LOG_SPAN = 100.0
_MARKERS = {"fp32": "s", "fp16": "D", "int8": "^", "int4w": "v", "greedy": "P", "bops-proxy": "X"}
_SPARE_MARKERS = ("<", ">", "h", "p", "d", "8")


def plot_pareto(
    path: str | os.PathLike, planning: PlanningResult, *, measured_ms: float | None = None, title: str = ""
) -> Path:
    """Draw the latency/loss plane of ``planning`` into the PNG ``path`` (parent folders created).

    x: predicted latency (ms); y: estimated loss (Σ per-layer KL, 0 for fp32). The frontier is a step
    line (the least loss reachable within each latency), baselines are labelled markers, the chosen plan
    a star, the latency budget a dotted vertical line, and ``measured_ms`` (the chosen plan timed end to
    end) a hollow circle joined to the star. Returns the path; raises ``OSError`` if it cannot be written.
    """
    # matplotlib takes ~0.5 s to import; only a report with a frontier draws it.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=FIGURE_SIZE_INCHES, dpi=DPI)
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    plan = planning.plan
    losses = [_loss(p) for p in (plan, *planning.baselines.values(), *planning.frontier)]

    if planning.frontier:
        xs = [p.predicted["latency_ms"] for p in planning.frontier]
        ys = [_loss(p) for p in planning.frontier]
        ax.step(xs, ys, where="post", color="0.6", linewidth=1.2, zorder=1)
        ax.plot(xs, ys, "o", color="0.45", markersize=4, label="Pareto frontier (ILP)", zorder=2)

    spare = iter(_SPARE_MARKERS)
    for name, baseline in planning.baselines.items():
        marker = _MARKERS.get(name) or next(spare, "o")
        x, y = baseline.predicted["latency_ms"], _loss(baseline)
        ax.plot(x, y, marker, markersize=8, linestyle="none", label=name, zorder=3)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(6, 5), fontsize=8)

    chosen_ms, chosen_loss = plan.predicted["latency_ms"], _loss(plan)
    ax.plot(
        chosen_ms,
        chosen_loss,
        "*",
        color="crimson",
        markersize=16,
        markeredgecolor="black",
        label=f"chosen, predicted ({chosen_ms:.3f} ms)",
        zorder=5,
    )
    if measured_ms is not None:
        ax.plot([chosen_ms, measured_ms], [chosen_loss, chosen_loss], "--", color="crimson", zorder=4)
        ax.plot(
            measured_ms,
            chosen_loss,
            "o",
            markersize=11,
            markerfacecolor="none",
            markeredgecolor="crimson",
            markeredgewidth=2,
            label=f"chosen, measured on the board ({measured_ms:.3f} ms)",
            zorder=5,
        )
    if planning.budgets.latency_ms is not None:
        ax.axvline(
            planning.budgets.latency_ms,
            color="0.3",
            linestyle=":",
            linewidth=1,
            label=f"latency budget ({planning.budgets.latency_ms:.3f} ms)",
        )

    positive = [y for y in losses if y > 0]
    top = max(positive, default=1.0)
    log_scale = bool(positive) and top / min(positive) > _LOG_SPAN
    if log_scale:
        # Linear below the smallest positive loss's decade, so fp32's 0 sits on the floor, labelled 0.
        threshold = 10.0 ** math.floor(math.log10(min(positive)))
        ax.set_yscale("symlog", linthresh=threshold, linscale=1.0)
        ax.set_ylim(-0.25 * threshold, 3.0 * top)
    else:
        ax.set_ylim(-0.05 * top, 1.12 * top)
    ax.margins(x=0.08)
    ax.set_xlabel("predicted latency (ms)")
    scale_note = ", symmetric log: linear near 0" if log_scale else ""
    ax.set_ylabel(f"estimated loss (Σ per-layer KL{scale_note})")
    ax.set_title(title or "Latency vs estimated loss (fp32 has loss 0)")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    figure.tight_layout()
    png = io.BytesIO()
    figure.savefig(png, format="png")
    return write_atomic(path, png.getvalue(), "Pareto plot")


def _loss(plan: Plan) -> float:
    return float(plan.predicted.get("sensitivity", 0.0))


__all__ = ["plot_pareto"]
