"""Choose one precision per layer: an exact integer program over measured latency and sensitivity.

Variables: a binary ``x[l, p]`` per layer and candidate precision (one chosen per layer), plus continuous
boundary indicators that make the precision-boundary costs linear:

- ``q[s]`` for each tensor ``s`` an integer layer can read: ``q[s] >= I(l) - I(producer of s)`` for every
  layer ``l`` reading ``s`` (``I`` = the layer is integer), so the ``quantize`` is paid exactly when an
  integer layer reads a float tensor (once per tensor, as the rewrite shares it);
- ``d[l]`` for each layer that can be integer: ``d[l] >= I(l) - I(r)`` for every layer ``r`` reading it,
  and ``d[l] >= I(l)`` when glue or the model output reads it: the ``dequantize`` is paid exactly when
  something float reads an integer layer.

Both are bounded from above as well (``q[s] <= Σ I(l)`` over its readers, ``q[s] <= 1 - I(producer)``;
``d[l] <= I(l)``, ``d[l] <= Σ (1 - I(r))`` over its readers, glue counting as float), so with binary
``x`` they equal the indicator exactly: a conversion fused into a layer may cost less than nothing (an
integer layer writing float32 straight from its accumulator can be faster than its requantize), and the
solver must not switch such a term on where no boundary is.

Latency = layers + quantize + dequantize + glue, the composition of :mod:`ohq_tvm.oqa.cost` (its
:func:`~ohq_tvm.oqa.cost.plan_latency` is the reference the tests hold the solver to). Peak memory = the
largest per-layer working set (weights + input + output at the layer's precision); its budget is one row
per layer, ``sum_p x[l, p] * memory(l, p) <= M``. The objective is either the summed sensitivity (under a
latency, size, peak-memory and/or BOPs budget) or the latency, size or BOPs (under a sensitivity budget).
Solved with ``scipy.optimize.milp`` (HiGHS).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np

from .budget import Budgets
from .errors import PlanError
from .oqa.cost import conversion_ms, plan_latency
from .oqa.workloads import ModelWorkloads
from .plan import Plan
from .precision import Precision

if TYPE_CHECKING:
    from scipy.optimize import LinearConstraint

OBJECTIVES = ("sensitivity", "latency", "size", "bops")
_TOLERANCE = 1e-9


@dataclass
class Problem:
    """Everything the solver needs about one model on one board.

    ``sensitivity[layer][precision]`` is the estimated accuracy cost of that layer alone in that
    precision (0 for fp32 by convention); ``latencies_ms`` the board's measured (or predicted) latency
    of every workload key of ``workloads``.
    """

    workloads: ModelWorkloads
    latencies_ms: Mapping[str, float]
    sensitivity: Mapping[str, Mapping[Precision, float]]
    layers: list[str] = field(init=False)

    def __post_init__(self) -> None:
        self.layers = list(self.workloads.layers)
        for layer_id, options in self.workloads.layers.items():
            known = self.sensitivity.get(layer_id, {})
            missing = [p.value for p in options if p not in known and p is not Precision.FP32]
            if missing:
                raise PlanError(f"no sensitivity for layer {layer_id!r} in {', '.join(missing)}")
        unmeasured = [w.label for w in self.workloads.unique() if w.key not in self.latencies_ms]
        if unmeasured:
            raise PlanError(
                f"{len(unmeasured)} operator(s) have no latency on this board (e.g. {unmeasured[0]}); "
                "measure the model first (ohq-tvm measure)"
            )

    def options(self, layer_id: str) -> list[Precision]:
        return list(self.workloads.layers[layer_id])

    def sensitivity_of(self, layer_id: str, precision: Precision) -> float:
        return float(self.sensitivity.get(layer_id, {}).get(precision, 0.0))

    def size_bytes(self, layer_id: str, precision: Precision) -> float:
        return float(self.workloads.infos[layer_id].weight_bytes(precision))

    def memory_bytes(self, layer_id: str, precision: Precision) -> float:
        """The layer's working set: weights plus input and output activations at ``precision``."""
        info = self.workloads.infos[layer_id]
        activations = math.prod(info.input_shape) + math.prod(info.output_shape)
        return float(info.weight_bytes(precision) + activations * precision.activation_bits / 8)

    def bops(self, layer_id: str, precision: Precision) -> float:
        """Bit operations: MACs × weight bits × activation bits (the hardware-blind proxy)."""
        info = self.workloads.infos[layer_id]
        return float(info.macs * precision.weight_bits * precision.activation_bits)

    def evaluate(self, assignments: Mapping[str, Precision]) -> dict[str, float]:
        """Latency (the reference composition), size, peak memory (the largest layer's), BOPs and
        sensitivity of a complete assignment."""
        return {
            "latency_ms": plan_latency(self.workloads, assignments, self.latencies_ms).total_ms,
            "size_bytes": sum(self.size_bytes(lid, p) for lid, p in assignments.items()),
            "memory_bytes": max((self.memory_bytes(lid, p) for lid, p in assignments.items()), default=0.0),
            "bops": sum(self.bops(lid, p) for lid, p in assignments.items()),
            "sensitivity": sum(self.sensitivity_of(lid, p) for lid, p in assignments.items()),
        }


class _Program:
    """The linear program of a :class:`Problem`: variable layout and coefficient rows."""

    def __init__(self, problem: Problem) -> None:
        self.problem = problem
        w = problem.workloads
        self.x: dict[tuple[str, Precision], int] = {}
        for layer_id in problem.layers:
            for precision in problem.options(layer_id):
                self.x[(layer_id, precision)] = len(self.x)
        count = len(self.x)
        self.integer_capable = [
            lid for lid in problem.layers if any(p.is_integer for p in problem.options(lid))
        ]
        # One quantize variable per source tensor read by integer-capable layers.
        self.q: dict[str, int] = {}
        self.q_cost: dict[str, float] = {}
        for layer_id in self.integer_capable:
            source = w.sources[layer_id]
            if source not in self.q:
                self.q[source] = count + len(self.q)
                self.q_cost[source] = conversion_ms(w.quantize[layer_id], problem.latencies_ms)
        count += len(self.q)
        self.d = {lid: count + i for i, lid in enumerate(self.integer_capable)}
        self.size = count + len(self.d)
        self.glue_ms = sum(problem.latencies_ms[g.key] for g in w.glue)

    def integer_row(self, layer_id: str | None, sign: float, row: np.ndarray) -> None:
        """Add ``sign * I(layer)`` to ``row``; nothing for ``None`` or a layer with no integer option."""
        if layer_id is None:
            return
        for precision in self.problem.options(layer_id):
            if precision.is_integer:
                row[self.x[(layer_id, precision)]] += sign

    def quantity(self, name: str) -> tuple[np.ndarray, float]:
        """Coefficients and constant of a linear quantity: latency_ms, size_bytes, bops or sensitivity."""
        p = self.problem
        row = np.zeros(self.size)
        constant = 0.0
        for (layer_id, precision), index in self.x.items():
            if name == "latency_ms":
                row[index] = p.latencies_ms[p.workloads.layers[layer_id][precision].key]
            elif name == "size_bytes":
                row[index] = p.size_bytes(layer_id, precision)
            elif name == "bops":
                row[index] = p.bops(layer_id, precision)
            else:
                row[index] = p.sensitivity_of(layer_id, precision)
        if name == "latency_ms":
            for source, index in self.q.items():
                row[index] = self.q_cost[source]
            for layer_id, index in self.d.items():
                row[index] = conversion_ms(p.workloads.dequantize[layer_id], p.latencies_ms)
            constant = self.glue_ms
        return row, constant

    def memory_rows(self) -> np.ndarray:
        """One row per layer: the working set of the layer in its chosen precision."""
        rows = np.zeros((len(self.problem.layers), self.size))
        position = {layer_id: i for i, layer_id in enumerate(self.problem.layers)}
        for (layer_id, precision), index in self.x.items():
            rows[position[layer_id], index] = self.problem.memory_bytes(layer_id, precision)
        return rows

    def constraints(self) -> list[LinearConstraint]:
        from scipy.optimize import LinearConstraint  # as in _solve

        p, w = self.problem, self.problem.workloads
        rows, lower, upper = [], [], []
        for layer_id in p.layers:  # exactly one precision per layer
            row = np.zeros(self.size)
            for precision in p.options(layer_id):
                row[self.x[(layer_id, precision)]] = 1
            rows.append(row)
            lower.append(1)
            upper.append(1)
        for layer_id in self.integer_capable:
            row = np.zeros(self.size)  # q[source] - I(l) + I(producer) >= 0
            row[self.q[w.sources[layer_id]]] = 1
            self.integer_row(layer_id, -1, row)
            self.integer_row(w.producers[layer_id], 1, row)
            rows.append(row)
            lower.append(0)
            upper.append(np.inf)
            for reader in w.readers[layer_id]:  # d[l] - I(l) + I(reader) >= 0
                row = np.zeros(self.size)
                row[self.d[layer_id]] = 1
                self.integer_row(layer_id, -1, row)
                self.integer_row(reader, 1, row)
                rows.append(row)
                lower.append(0)
                upper.append(np.inf)
            row = np.zeros(self.size)  # d[l] - I(l) <= 0
            row[self.d[layer_id]] = 1
            self.integer_row(layer_id, -1, row)
            rows.append(row)
            lower.append(-np.inf)
            upper.append(0)
            row = np.zeros(self.size)  # d[l] + Σ I(reader) <= number of readers
            row[self.d[layer_id]] = 1
            for reader in w.readers[layer_id]:
                self.integer_row(reader, 1, row)
            rows.append(row)
            lower.append(-np.inf)
            upper.append(len(w.readers[layer_id]))
        readers: dict[str, list[str]] = {}
        for layer_id in self.integer_capable:
            readers.setdefault(w.sources[layer_id], []).append(layer_id)
        for source, index in self.q.items():
            row = np.zeros(self.size)  # q[s] - Σ I(l) <= 0
            row[index] = 1
            for layer_id in readers[source]:
                self.integer_row(layer_id, -1, row)
            rows.append(row)
            lower.append(-np.inf)
            upper.append(0)
            row = np.zeros(self.size)  # q[s] + I(producer) <= 1
            row[index] = 1
            self.integer_row(w.producers[readers[source][0]], 1, row)
            rows.append(row)
            lower.append(-np.inf)
            upper.append(1)
        return [LinearConstraint(np.array(rows), lower, upper)]

    def decode(self, solution: np.ndarray) -> dict[str, Precision]:
        chosen = {}
        for (layer_id, precision), index in self.x.items():
            if solution[index] > 0.5:
                chosen[layer_id] = precision
        return chosen


_QUANTITY = {"sensitivity": "sensitivity", "latency": "latency_ms", "size": "size_bytes", "bops": "bops"}


def _solve(program: _Program, objective: str, budgets: Budgets) -> dict[str, Precision] | None:
    # scipy.optimize takes ~0.5 s to import (more on a busy machine): loaded when a plan is solved, not
    # when the command starts.
    from scipy.optimize import Bounds, LinearConstraint, milp

    cost, _ = program.quantity(_QUANTITY[objective])
    # A tie-break towards lower latency among equally good plans, too small to change the optimum.
    tie, _ = program.quantity("latency_ms" if objective != "latency" else "sensitivity")
    scale = max(float(np.abs(cost).sum()), 1.0) / max(float(np.abs(tie).sum()), 1.0)
    cost = cost + 1e-7 * scale * tie
    constraints = program.constraints()
    for name, limit in (
        ("latency_ms", budgets.latency_ms),
        ("size_bytes", budgets.size_bytes),
        ("bops", budgets.bops),
        ("sensitivity", budgets.sensitivity),
    ):
        if limit is not None:
            row, constant = program.quantity(name)
            slack = _TOLERANCE * max(abs(limit), 1.0)
            constraints.append(LinearConstraint(row[None, :], -np.inf, limit - constant + slack))
    if budgets.memory_bytes is not None:
        slack = _TOLERANCE * max(budgets.memory_bytes, 1.0)
        constraints.append(LinearConstraint(program.memory_rows(), -np.inf, budgets.memory_bytes + slack))
    integrality = np.zeros(program.size)
    integrality[: len(program.x)] = 1
    result = milp(
        cost,
        constraints=constraints,
        integrality=integrality,
        bounds=Bounds(0, 1),
        options={"presolve": True},
    )
    if result.status == 2:  # infeasible
        return None
    if not result.success:
        raise PlanError(f"the solver failed: {result.message}")
    return program.decode(result.x)


def solve(problem: Problem, objective: str = "sensitivity", budgets: Budgets | None = None, **meta) -> Plan:
    """The optimal plan: minimise ``objective`` under ``budgets``.

    Returns a :class:`~ohq_tvm.plan.Plan` (``source="ilp"``, or ``"bops-proxy"`` when minimising BOPs)
    whose ``predicted`` holds its latency, size, peak memory, BOPs and sensitivity. Raises
    :class:`PlanError` when no plan meets the budgets, stating the smallest latency (or other budgeted
    quantity) any plan reaches.
    """
    if objective not in OBJECTIVES:
        raise PlanError(f"unknown objective {objective!r}; use one of {', '.join(OBJECTIVES)}")
    budgets = budgets or Budgets()
    program = _Program(problem)
    chosen = _solve(program, objective, budgets)
    if chosen is None:
        raise PlanError(_infeasible_message(program, budgets))
    source = "bops-proxy" if objective == "bops" else "ilp"
    return Plan(chosen, source=source, predicted=problem.evaluate(chosen), **meta)


def _smallest(program: _Program, name: str) -> float:
    """The smallest value of the quantity ``name`` any plan reaches, other budgets aside."""
    problem = program.problem
    if name == "memory_bytes":  # every layer in its leanest precision: the peak no plan goes below
        return max(min(problem.memory_bytes(lid, p) for p in problem.options(lid)) for lid in problem.layers)
    objective = next(key for key, quantity in _QUANTITY.items() if quantity == name)
    return problem.evaluate(_solve(program, objective, Budgets()))[name]


def _infeasible_message(program: _Program, budgets: Budgets) -> str:
    parts = []
    for name, label, unit in (
        ("latency_ms", "latency ms", "ms"),
        ("size_bytes", "size bytes", "bytes"),
        ("memory_bytes", "peak memory", "bytes"),
        ("bops", "bops", "bit-ops"),
        ("sensitivity", "sensitivity", ""),
    ):
        limit = getattr(budgets, name)
        if limit is None:
            continue
        reachable = _smallest(program, name)
        if reachable > limit * (1 + 1e-9):
            parts.append(
                f"{label} budget {limit:g} {unit} is below the smallest any plan reaches, "
                f"{reachable:.6g} {unit}".replace("  ", " ")
            )
    detail = "; ".join(parts) or "the budgets cannot all be met by one plan"
    return f"no plan meets the budgets: {detail}"


def pareto_frontier(problem: Problem, points: int = 12) -> list[Plan]:
    """Plans trading latency for sensitivity, none dominated by another, fastest first.

    Sweeps ``points`` latency budgets from the fastest plan to the most accurate one; at each, the
    least-sensitive plan, then the fastest plan with that sensitivity.
    """
    program = _Program(problem)
    fastest = problem.evaluate(_solve(program, "latency", Budgets()))["latency_ms"]
    accurate = problem.evaluate(_solve(program, "sensitivity", Budgets()))["latency_ms"]
    plans: dict[tuple, Plan] = {}
    for budget in np.linspace(fastest, max(accurate, fastest), max(points, 2)):
        best = _solve(program, "sensitivity", Budgets(latency_ms=float(budget)))
        if best is None:
            continue
        level = problem.evaluate(best)["sensitivity"]
        quickest = _solve(program, "latency", Budgets(sensitivity=level)) or best
        key = tuple(sorted((k, v.value) for k, v in quickest.items()))
        plans.setdefault(key, Plan(quickest, source="ilp-pareto", predicted=problem.evaluate(quickest)))
    frontier = [
        plan
        for plan in plans.values()
        if not any(
            _dominates(other.predicted, plan.predicted) for other in plans.values() if other is not plan
        )
    ]
    return sorted(frontier, key=lambda plan: plan.predicted["latency_ms"])


def knee(frontier: list[Plan]) -> Plan:
    """The frontier's knee: on axes scaled to [0, 1], the plan farthest below the straight line from the
    fastest plan to the most accurate one (the end points themselves when the frontier has fewer than 3).

    Raises :class:`PlanError` for an empty frontier.
    """
    if not frontier:
        raise PlanError("an empty Pareto frontier has no knee")
    points = sorted(frontier, key=lambda plan: plan.predicted["latency_ms"])
    if len(points) < 3:
        return points[0]
    latency = np.array([p.predicted["latency_ms"] for p in points])
    loss = np.array([p.predicted["sensitivity"] for p in points])
    x = (latency - latency[0]) / max(latency[-1] - latency[0], 1e-12)
    y = (loss - loss[-1]) / max(loss[0] - loss[-1], 1e-12)
    # Line from (0, 1) (fastest, most loss) to (1, 0): below it means x + y < 1.
    return points[int(np.argmax(1.0 - x - y))]


def _dominates(a: Mapping[str, float], b: Mapping[str, float]) -> bool:
    keys = ("latency_ms", "sensitivity")
    return all(a[k] <= b[k] + 1e-12 for k in keys) and any(a[k] < b[k] - 1e-12 for k in keys)


def greedy(problem: Problem, latency_budget_ms: float) -> Plan:
    """The baseline without a solver: from the least sensitive plan, repeatedly make the one-layer change
    with the most latency saved per sensitivity added, until the budget is met (or nothing helps)."""
    chosen = {
        lid: min(problem.options(lid), key=lambda p: (problem.sensitivity_of(lid, p), p != Precision.FP32))
        for lid in problem.layers
    }
    current = problem.evaluate(chosen)
    while current["latency_ms"] > latency_budget_ms:
        best, best_ratio = None, -np.inf
        for layer_id in problem.layers:
            for precision in problem.options(layer_id):
                if precision == chosen[layer_id]:
                    continue
                trial = dict(chosen, **{layer_id: precision})
                after = problem.evaluate(trial)
                saved = current["latency_ms"] - after["latency_ms"]
                added = after["sensitivity"] - current["sensitivity"]
                if saved <= 0:
                    continue
                ratio = saved / max(added, 1e-12)
                if ratio > best_ratio:
                    best, best_ratio = trial, ratio
        if best is None:
            break
        chosen, current = best, problem.evaluate(best)
    return Plan(chosen, source="greedy", predicted=current)


class Solver(Protocol):
    """Chooses one precision per layer of a :class:`Problem`: the least-sensitive plan within budgets,
    the latency/loss frontier, and the baselines a chosen plan is compared with."""

    def least_loss(self, problem: Problem, budgets: Budgets, **meta) -> Plan:
        """The plan of least summed sensitivity within ``budgets`` (``meta``: the Plan's model and target
        fields). Raises :class:`PlanError` when no plan meets them."""
        ...

    def frontier(self, problem: Problem, points: int) -> list[Plan]:
        """About ``points`` plans trading latency for sensitivity, none dominating another."""
        ...

    def baselines(self, problem: Problem, chosen: Plan, budgets: Budgets, **meta) -> dict[str, Plan]:
        """Plans other methods would pick under the same budgets, by name."""
        ...


class ILPSolver:
    """The integer program of this module (:func:`solve`, :func:`pareto_frontier`); its baselines:
    ``greedy`` (same latency budget, when there is one) and ``bops-proxy`` (fewest bit-operations at the
    chosen plan's sensitivity and within its size and memory budgets, as hardware-blind methods pick)."""

    def least_loss(self, problem: Problem, budgets: Budgets, **meta) -> Plan:
        return solve(problem, "sensitivity", budgets, **meta)

    def frontier(self, problem: Problem, points: int) -> list[Plan]:
        return pareto_frontier(problem, points)

    def baselines(self, problem: Problem, chosen: Plan, budgets: Budgets, **meta) -> dict[str, Plan]:
        plans = {}
        if budgets.latency_ms is not None:
            plans["greedy"] = greedy(problem, budgets.latency_ms)
        bops = Budgets(
            sensitivity=chosen.predicted["sensitivity"],
            size_bytes=budgets.size_bytes,
            memory_bytes=budgets.memory_bytes,
        )
        plans["bops-proxy"] = solve(problem, "bops", bops, **meta)
        return plans


__all__ = [
    "OBJECTIVES",
    "Budgets",
    "ILPSolver",
    "Problem",
    "Solver",
    "greedy",
    "knee",
    "pareto_frontier",
    "solve",
]
