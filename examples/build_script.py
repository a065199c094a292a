"""The OHQ stages one by one, from a TVM build script: what ``ohq-tvm compile --budget`` runs, opened up.

    python examples/build_script.py MODEL.onnx [--budget latency=0.9*int8] [--db oqa.sqlite] [-o out]

Without a model it writes the generated tiny CNN and uses that. Each stage is a plain call or a Relax pass
in ``tvm.transform.Sequential``; swap in your own passes between them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import tvm
from tvm import relax

from ohq_tvm import models
from ohq_tvm.board import LoopbackBoard, sigterm_as_exit
from ohq_tvm.budget import BudgetSpec
from ohq_tvm.calibration import calibrate
from ohq_tvm.codegen import build_executable, find_toolchain
from ohq_tvm.config import MeasurementConfig
from ohq_tvm.frontend import load_onnx
from ohq_tvm.ilp import Problem, solve
from ohq_tvm.mqe import estimate_sensitivity
from ohq_tvm.oqa.run import measure_model
from ohq_tvm.passes import AnnotateCandidates, ApplyPlan, UseCPUKernels
from ohq_tvm.plan import Plan
from ohq_tvm.precision import Precision
from ohq_tvm.targets import resolve_target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", help="an .onnx file (default: the generated tiny CNN)")
    parser.add_argument("--budget", default="size=0.5*fp32", help="as for `ohq-tvm compile --budget`")
    parser.add_argument("--db", default="oqa.sqlite", help="measurement database")
    parser.add_argument("-o", "--output", default="out", help="output folder")
    args = parser.parse_args()
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    model = args.model or models.save(models.tiny_cnn(), out / "tiny_cnn.onnx")

    spec = resolve_target("host")  # the board's description: or "rpi5", a board TOML, a triple
    imported = load_onnx(model)  # Relax module; layers carry ids
    precisions = [Precision.FP32, Precision.INT8]
    measurement = MeasurementConfig(database=args.db, precisions=precisions)
    with LoopbackBoard() as board:  # the live board: or TrackerBoard(host, port, key)
        # OQA: every candidate operator timed on the board, stored in the database.
        measured = measure_model(imported, spec, board=board, measurement=measurement)
        # MQE: one compiled module, one forward pass per (layer, precision), synthetic inputs.
        sensitivity = estimate_sensitivity(imported, [Precision.INT8], target=spec, board=board)
    problem = Problem(measured.workloads, measured.latencies_ms, sensitivity.values)

    # ILP: the least sensitive plan within the budget (relative limits against the uniform plans).
    layers = list(measured.workloads.layers)
    references = {p.value: problem.evaluate(Plan.uniform(layers, p).assignments) for p in precisions}
    budgets = BudgetSpec.parse(args.budget).resolve(references)
    plan = solve(problem, "sensitivity", budgets, model_sha256=imported.sha256, target=spec.name)
    plan.save(out / "plan.json")

    # Rewrite: real integer layers, then the integer kernels and your own passes, then build and export.
    calibration = calibrate(imported, "minmax")  # synthetic inputs; samples=[...] for yours
    pipeline = tvm.transform.Sequential(
        [
            AnnotateCandidates(spec, pin_first_last=False),
            ApplyPlan(plan, calibration),
            UseCPUKernels(spec.tvm_target()),
            relax.transform.FoldConstant(),
        ]
    )
    executable = build_executable(pipeline(imported.mod), spec)
    library = out / "model.so"
    executable.export_library(str(library), fcompile=find_toolchain(spec.cross_triple).fcompile())
    counts = ", ".join(f"{n} {p}" for p, n in plan.counts().items())
    print(f"plan: {counts}; predicted {plan.predicted['latency_ms']:.3f} ms; wrote {library}")


if __name__ == "__main__":
    with sigterm_as_exit():  # a killed run still takes its loopback board down
        main()
