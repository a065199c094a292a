"""Measured-latency plans vs BOPs-proxy plans under the same budgets, built and timed on the host board.

Usage: python benchmarks/ohq_vs_bops.py [--repeats N] [--out benchmarks/results] [--models a,b]
       [--precisions fp32,int8[,int4w]]

The OHQ claim: choosing precisions from latency measured on the board beats choosing them from bit-ops
(the hardware-blind proxy of HAWQ-V3/NNCF-style methods). For each model (generated, random weights):

1. every operator is measured on the loopback host board (candidates: ``--precisions``, fp32 and int8 by
   default), MQE estimates each layer's sensitivity to each lower precision on 2 synthetic batches, on
   the same board;
2. for each budget case, the ILP picks the fastest plan by measured latency (``ohq``) and the plan with
   the fewest bit-operations (``bops``) under the same sensitivity and weight-size budgets;
   The operators' latencies are scaled to what they cost inside the model (per-precision factors from
   the uniform plans timed whole, as ``ohq-tvm plan`` does);
3. both plans are rewritten (real int8 kernels), built, and timed on the board in interleaved rounds,
   each timing once the board is quiet (the measurement's canary gate).

Reports the measured speed ratio bops / ohq per case (goal >= 1.15), with each plan's predicted latency.
Writes results/ohq_vs_bops.json and results/ohq_vs_bops.md; with int4w among the precisions,
results/ohq_vs_bops_int4w.* (packed int4 weights: half the bit-operations of int8 by the proxy's count).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from ohq_tvm import Precision, models
from ohq_tvm.board import LoopbackBoard, sigterm_as_exit
from ohq_tvm.calibration import calibrate
from ohq_tvm.codegen.module import build_executable
from ohq_tvm.frontend import load_onnx
from ohq_tvm.ilp import Budgets, Problem, solve
from ohq_tvm.mqe import estimate_sensitivity
from ohq_tvm.oqa import LatencyDatabase, Measurer, TimingConfig, extract_workloads
from ohq_tvm.oqa.in_model import measured_scales
from ohq_tvm.oqa.whole_model import time_with_measurer
from ohq_tvm.passes import AnnotateCandidates, ApplyPlan
from ohq_tvm.plan import Plan
from ohq_tvm.targets import resolve_target

from timing import machine_record, parse_args, scratch_host_board, write_results

CASES = {"mobilenet_v2": models.mobilenet_v2, "efficientnet_lite0": models.efficientnet_lite0}
DEFAULT_PRECISIONS = "fp32,int8"
TIMING = TimingConfig(repeat=5, min_repeat_ms=40)


def _budget_cases(problem: Problem) -> dict[str, Budgets]:
    layers = list(problem.workloads.layers)
    fp32 = problem.evaluate(Plan.uniform(layers, Precision.FP32).assignments)
    int8 = problem.evaluate(Plan.uniform(layers, Precision.INT8).assignments)
    cases = {
        "sensitivity <= 1/2 of uniform int8": Budgets(sensitivity=0.5 * int8["sensitivity"]),
        "weights <= 1/2 of fp32": Budgets(
            size_bytes=0.5 * fp32["size_bytes"], sensitivity=int8["sensitivity"]
        ),
        "weights <= 1/3 of fp32": Budgets(size_bytes=fp32["size_bytes"] / 3, sensitivity=int8["sensitivity"]),
    }
    if any(Precision.INT4W in options for options in problem.workloads.layers.values()):
        # Below uniform int8's size (1/4 of fp32) some weights must be int4: which ones is the question.
        # Loss budget: twice the least sensitivity any plan that small reaches.
        size = fp32["size_bytes"] / 5
        least = solve(problem, "sensitivity", Budgets(size_bytes=size)).predicted["sensitivity"]
        cases["weights <= 1/5 of fp32, sensitivity <= 2x the least at that size"] = Budgets(
            size_bytes=size, sensitivity=2 * least
        )
    return cases


def bench(
    name: str, model, board: LoopbackBoard, spec, db: LatencyDatabase, repeats: int, candidates: list
) -> dict:
    imported = load_onnx(model)
    workloads = extract_workloads(AnnotateCandidates(candidates, pin_first_last=False)(imported.mod))
    measurer = Measurer(board, spec, db, timing=TIMING)
    measurer.run(workloads.unique())
    # The parts as they run inside the model: per-precision factors from the uniform plans timed whole.
    latencies = measured_scales(measurer, imported, workloads).apply(
        workloads, measurer.latencies(workloads.unique())
    )
    calibration = calibrate(imported, "minmax", num_samples=4)
    lower = [p for p in candidates if p is not Precision.FP32]
    sensitivity = estimate_sensitivity(imported, lower, calibration, num_batches=2, board=board)
    problem = Problem(workloads, latencies, sensitivity.values)
    cases = {}
    with tempfile.TemporaryDirectory() as scratch:
        libraries, plans = {}, {}
        for case, budgets in _budget_cases(problem).items():
            for kind, objective in (("ohq", "latency"), ("bops", "bops")):
                plan = solve(problem, objective, budgets)
                library = Path(scratch) / f"{name}_{len(libraries)}.so"
                mod = ApplyPlan(plan, calibration)(imported.mod)
                build_executable(mod, spec).export_library(str(library))
                libraries[(case, kind)] = library
                plans[(case, kind)] = plan
        # Interleaved rounds (every plan once per round), each timing once the board is quiet.
        timed = time_with_measurer(measurer, libraries, imported, rounds=repeats)
    for case in dict.fromkeys(c for c, _ in plans):
        row = {}
        for kind in ("ohq", "bops"):
            plan = plans[(case, kind)]
            row[kind] = {
                "measured_ms": timed[(case, kind)].median_ms,
                "raw_ms": list(timed[(case, kind)].repeats_ms),
                "predicted": plan.predicted,
                "counts": plan.counts(),
                "assignments": {k: v.value for k, v in plan.assignments.items()},
            }
        row["speed_ratio_bops_over_ohq"] = row["bops"]["measured_ms"] / row["ohq"]["measured_ms"]
        cases[case] = row
    return {
        "model": name,
        "sensitivity": {"forward_passes": sensitivity.forward_passes, "seconds": sensitivity.seconds},
        "cases": cases,
    }


def main() -> None:
    args = parse_args(
        __doc__, repeats=5, extra={"--models": ",".join(CASES), "--precisions": DEFAULT_PRECISIONS}
    )
    spec = resolve_target("host")
    names = [n for n in args.models.split(",") if n]
    candidates = [Precision.parse(p) for p in args.precisions.split(",") if p]
    with scratch_host_board("ohq-vs-bops") as (board, db):
        results = [bench(n, CASES[n](), board, spec, db, args.repeats, candidates) for n in names]
    record = {
        **machine_record(spec.tvm_target()),
        "timing": TIMING.__dict__,
        "precisions": [p.value for p in candidates],
        "results": results,
    }
    lines = [
        "# Measured-latency plans (OHQ) vs bit-op plans (BOPs proxy), host board",
        "",
        "Same ILP, same sensitivity (MQE, synthetic data) and size budgets; only the cost differs. "
        f"Candidates: {', '.join(p.value for p in candidates)}. "
        "Both plans built with real integer kernels (zero-budget schedule) and timed on the board, "
        f"median over {args.repeats} interleaved rounds of {TIMING.repeat} timings each, every timing "
        "taken once the board is quiet (canary gate). Predicted: the operators measured alone, scaled by "
        "per-precision in-model factors from the uniform plans timed whole.",
        "",
        "| model | budgets | OHQ plan | OHQ ms (predicted) | BOPs plan | BOPs ms (predicted) | BOPs / OHQ |",
        "|---|---|---|---|---|---|---|",
    ]
    for result in results:
        for case, row in result["cases"].items():
            ohq, bops = row["ohq"], row["bops"]

            def counts(r: dict) -> str:
                return " ".join(f"{n} {p}" for p, n in sorted(r["counts"].items()))

            lines.append(
                f"| {result['model']} | {case} | {counts(ohq)} | {ohq['measured_ms']:.2f} "
                f"({ohq['predicted']['latency_ms']:.2f}) | {counts(bops)} | {bops['measured_ms']:.2f} "
                f"({bops['predicted']['latency_ms']:.2f}) | {row['speed_ratio_bops_over_ohq']:.2f} |"
            )
    name = "ohq_vs_bops_int4w" if Precision.INT4W in candidates else "ohq_vs_bops"
    write_results(args.out, name, record, lines)


if __name__ == "__main__":
    with sigterm_as_exit():  # a killed run still takes its loopback board down
        main()
