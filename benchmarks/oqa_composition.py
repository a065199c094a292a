"""Hardware truth for OQA: do the per-operator latencies measured on the board add up to the model's?

Usage: python benchmarks/oqa_composition.py [--repeats N] [--out benchmarks/results] [--models a,b,c]
       [--board host | rk3588 --models mobilenet_v2_96 [--arm-runtime ../shared/arm-board/aarch64]]

With ``--board`` naming an ARM board, the same check runs on that board emulated under qemu (see
docs/boards.md): the latencies are emulated and mean nothing about the real board; the check is of the
structure (results/oqa_composition_<board>_emulated.*).

On the loopback host board (one RPC server), for each model (MobileNetV2 and EfficientNet-Lite0
generated, ResNet-18 from its torch definition; random weights: latency does not depend on weight values):

1. every workload of the model (layers in fp32 and int8, quantize/dequantize as the build fuses them,
   glue) is measured into a fresh database, exactly as ``ohq-tvm measure`` does (kernel by kernel,
   weights and output flushed from the caches before each run, input warm: see
   ``ohq_tvm.oqa.kernel_timing``), and so is every conversion as a standalone operator (how they were
   timed before: the breakdown);
2. the uniform fp32 and int8 plans are built whole and timed (``ohq_tvm.oqa.in_model``, as planning
   does), giving each precision's in-model factor;
3. MQE estimates each layer's int8 sensitivity (2 synthetic batches); mixed plans the factors were not
   fitted on: halves, alternation, random 80%-int8 mixes, the ILP's picks (least sensitivity) under
   three latency budgets between uniform int8 and fp32, the greedy baseline and the bit-ops proxy at the
   middle budget's sensitivity;
4. each plan's predicted latency, as the sum of the parts measured alone and with the in-model factors
   (conversions fused, what planning uses; and, for the breakdown, conversions timed as standalone
   operators, with factors fitted the same way), is compared with the end-to-end latency of the whole
   model built with that plan and timed on the same board with the same timer, ``--repeats`` times
   (median reported);
5. the XGBoost latency model's cross-validated error over all rows, and its error predicting one model's
   unseen workloads from the other model's measurements.

The ratio predicted / measured on the mixed plans is the number that matters (targets: mean error <= 10%,
worst <= 15%; the ILP's picks within 5%). Writes results/oqa_composition.json (machine, versions, every
part's latency, raw end-to-end repeats) and results/oqa_composition.md.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx

from ohq_tvm import Precision, models
from ohq_tvm.board import Board, EmulatedBoard, sigterm_as_exit
from ohq_tvm.calibration import calibrate
from ohq_tvm.codegen.module import build_executable
from ohq_tvm.codegen.toolchain import find_toolchain
from ohq_tvm.frontend import load_onnx
from ohq_tvm.ilp import Budgets, Problem, greedy, solve
from ohq_tvm.layers import quantizable_layers
from ohq_tvm.mqe import estimate_sensitivity
from ohq_tvm.oqa import LatencyDatabase, Measurer, TimingConfig, Workload, extract_workloads
from ohq_tvm.oqa.cost import plan_latency, plan_parts
from ohq_tvm.oqa.in_model import InModelScales, UniformRun, measured_scales
from ohq_tvm.oqa.latency_model import MIN_TRAINING_ROWS, LatencyModel, mape
from ohq_tvm.oqa.measure import schedule_label
from ohq_tvm.oqa.whole_model import time_with_measurer
from ohq_tvm.oqa.workloads import ModelWorkloads
from ohq_tvm.passes import AnnotateCandidates, ApplyPlan
from ohq_tvm.plan import Plan
from ohq_tvm.targets import resolve_target

from timing import machine_record, parse_args, scratch_host_board, write_results


def resnet18() -> onnx.ModelProto:
    """ResNet-18 from its torch definition (benchmarks/pretrained.py; random weights), as ONNX."""
    import pretrained

    with tempfile.TemporaryDirectory() as folder:
        path = pretrained.export_onnx(pretrained.load_resnet18(), (1, 3, 224, 224), f"{folder}/resnet18.onnx")
        return onnx.load(path)


CASES = {
    "mobilenet_v2": models.mobilenet_v2,
    "efficientnet_lite0": models.efficientnet_lite0,
    "resnet18": resnet18,
    # For an emulated ARM board, where a full-size model takes too long under qemu: the structure only.
    "mobilenet_v2_96": lambda: models.mobilenet_v2(size=96, width=0.5),
}
HOST_MODELS = "mobilenet_v2,efficientnet_lite0,resnet18"
# TVM's RPC server built for aarch64, beside the repository (see ../shared/arm-board).
SHARED_ARM_RUNTIME = Path(__file__).resolve().parents[2] / "shared" / "arm-board" / "aarch64"
PLANS = (Precision.FP32, Precision.INT8)
TIMING = TimingConfig(repeat=5, min_repeat_ms=40)
ACCEPT = (0.85, 1.15)
# The ILP's latency budgets: uniform int8's predicted latency plus these shares of the way to fp32's.
BUDGET_SHARES = (0.1, 0.3, 0.6)


def mixed_plans(layers: list[str]) -> dict[str, dict[str, Precision]]:
    """Plans the in-model scales were not fitted on: halves, alternation, and random 80%-int8 mixes."""
    n = len(layers)
    rng = np.random.default_rng(1)
    int8, fp32 = Precision.INT8, Precision.FP32
    return {
        "first half int8": {lid: int8 if i < n // 2 else fp32 for i, lid in enumerate(layers)},
        "second half int8": {lid: fp32 if i < n // 2 else int8 for i, lid in enumerate(layers)},
        "alternate": {lid: int8 if i % 2 else fp32 for i, lid in enumerate(layers)},
        **{
            f"random 80% int8 #{k}": {lid: int8 if rng.random() < 0.8 else fp32 for lid in layers}
            for k in (1, 2, 3)
        },
    }


def chosen_plans(problem: Problem) -> dict[str, dict[str, Precision]]:
    """The plans planning would pick: the ILP's least-sensitive plan under three latency budgets, the
    greedy baseline and the bit-ops proxy (fewest bit-operations at the ILP's sensitivity) at the middle
    one."""
    layers = list(problem.workloads.layers)
    fp32 = problem.evaluate(Plan.uniform(layers, Precision.FP32).assignments)["latency_ms"]
    int8 = problem.evaluate(Plan.uniform(layers, Precision.INT8).assignments)["latency_ms"]
    plans = {}
    for share in BUDGET_SHARES:
        budget = int8 + share * (fp32 - int8)
        plans[f"ilp, latency <= int8 + {share:g} (fp32 - int8)"] = solve(
            problem, budgets=Budgets(latency_ms=budget)
        )
    middle_share = BUDGET_SHARES[1]
    middle = plans[f"ilp, latency <= int8 + {middle_share:g} (fp32 - int8)"]
    plans[f"greedy, same budget as ilp {middle_share:g}"] = greedy(problem, middle.predicted["latency_ms"])
    plans[f"bit-ops proxy, sensitivity of ilp {middle_share:g}"] = solve(
        problem, "bops", Budgets(sensitivity=middle.predicted["sensitivity"])
    )
    return {label: dict(plan.assignments) for label, plan in plans.items()}


def standalone_conversions(workloads: ModelWorkloads) -> ModelWorkloads:
    """``workloads`` with every conversion a standalone operator (quantize of the layer's input, a
    dequantize of its output), as they were timed before conversions were timed fused."""
    quantize = {
        lid: Workload("quantize", "quantize", Precision.INT8, info.input_shape, info.input_shape)
        for lid, info in workloads.infos.items()
        if lid in workloads.quantize
    }
    dequantize = {
        lid: Workload("dequantize", "dequantize", Precision.INT8, info.output_shape, info.output_shape)
        for lid, info in workloads.infos.items()
        if lid in workloads.dequantize
    }
    return replace(workloads, quantize=quantize, dequantize=dequantize)


def fitted(workloads: ModelWorkloads, latencies: dict, scales: InModelScales) -> dict[str, float]:
    """``latencies`` scaled by factors fitted on the same uniform plans' whole timings, with
    ``workloads``' conversions (the factors depend on what the conversions are taken to cost)."""
    runs = {}
    for precision, run in scales.runs.items():
        parts = plan_latency(workloads, dict.fromkeys(workloads.layers, precision), latencies)
        layers_ms = parts.by_kind().get("layer", 0.0)
        runs[precision] = UniformRun(precision, run.measured_ms, layers_ms, parts.total_ms - layers_ms)
    return InModelScales(runs).apply(workloads, latencies)


def layers_by_precision(parts) -> dict[str, float]:
    """The layers' measured latencies (alone, unscaled) summed per precision."""
    sums: dict[str, float] = {}
    for _, workload, ms in parts.parts:
        if workload.kind == "layer":
            sums[workload.precision.value] = sums.get(workload.precision.value, 0.0) + ms
    return sums


def same_rounds_ratios(plans: dict[str, dict]) -> dict[str, float]:
    """predicted / measured with the in-model factors fitted on the uniform plans as measured in the
    same interleaved rounds as every other plan: the composition's own error, without the drift of the
    board between the session planning fits its factors in and the one the plans are checked in."""
    scales = {}
    for row in plans.values():
        if row["fitted"]:
            ((precision, layers_ms),) = layers_of(row).items()
            scales[precision] = (row["measured_ms"] - (row["parts_ms"] - layers_ms)) / layers_ms
    ratios = {}
    for label, row in plans.items():
        layers = layers_of(row)
        predicted = row["parts_ms"] + sum(ms * (scales.get(p, 1.0) - 1) for p, ms in layers.items())
        ratios[label] = predicted / row["measured_ms"]
    return ratios


def layers_of(row: dict) -> dict[str, float]:
    """A plan row's layer milliseconds per precision (from its parts' labels in a record without them)."""
    if "layers_by_precision_ms" in row:
        return row["layers_by_precision_ms"]
    sums: dict[str, float] = {}
    for part in row["parts"]:
        if "@" in part["label"] and " fused into " not in part["label"]:
            precision = part["label"].rsplit("@", 1)[1]
            sums[precision] = sums.get(precision, 0.0) + part["ms"]
    return sums


def boundaries(workloads: ModelWorkloads, assignments) -> int:
    return sum(1 for _, w in plan_parts(workloads, assignments) if w.kind in ("quantize", "dequantize"))


def bench(name: str, model, board: Board, spec, db: LatencyDatabase, repeats: int) -> dict:
    imported = load_onnx(model)
    annotated = AnnotateCandidates(list(PLANS), pin_first_last=False)(imported.mod)
    workloads = extract_workloads(annotated)
    alone = standalone_conversions(workloads)
    measurer = Measurer(board, spec, db, timing=TIMING)
    started = time.perf_counter()
    everything = list({w.key: w for w in workloads.unique() + alone.unique()}.values())
    summary = measurer.run(everything)
    print(f"{name}: {summary.measured} workloads measured, {len(summary.failed)} failed", flush=True)
    measure_s = time.perf_counter() - started
    latencies = measurer.latencies(everything)
    started = time.perf_counter()
    scales = measured_scales(measurer, imported, workloads, progress=print)
    whole_s = time.perf_counter() - started
    in_model = scales.apply(workloads, latencies)
    in_model_alone = fitted(alone, latencies, scales)
    layers = quantizable_layers(imported.mod)
    calibration = calibrate(imported, "minmax", num_samples=4)
    started = time.perf_counter()
    # On this machine (an emulated board's latencies are emulated, its numerics not: same estimate).
    sensitivity = estimate_sensitivity(imported, [Precision.INT8], calibration, num_batches=2)
    mqe_s = time.perf_counter() - started
    problem = Problem(workloads, in_model, sensitivity.values)
    picked = chosen_plans(problem)
    plans = {p.value: Plan.uniform(layers, p).assignments for p in PLANS}
    plans |= mixed_plans(list(workloads.layers)) | picked
    libraries = {}
    with tempfile.TemporaryDirectory() as scratch:
        for index, (label, assignments) in enumerate(plans.items()):
            plan = Plan(dict(assignments))
            integer = any(p.is_integer for p in plan.assignments.values())
            mod = ApplyPlan(plan, calibration if integer else None)(imported.mod)
            libraries[label] = Path(scratch) / f"{name}_{index}.so"
            build_executable(mod, spec).export_library(
                str(libraries[label]), fcompile=find_toolchain(spec.cross_triple).fcompile()
            )
        # Timed like the uniform plans above: interleaved rounds, each once the board is quiet.
        timed = time_with_measurer(measurer, libraries, imported, rounds=repeats)
    rows = {}
    for label, assignments in plans.items():
        parts = plan_latency(workloads, assignments, latencies)
        scaled = plan_latency(workloads, assignments, in_model)
        scaled_alone = plan_latency(alone, assignments, in_model_alone)
        by_kind = scaled.by_kind()
        measured = timed[label].median_ms
        rows[label] = {
            "fitted": label in {p.value for p in scales.runs},
            "chosen": label in picked,
            "counts": Plan(dict(assignments)).counts(),
            "boundaries": boundaries(workloads, assignments),
            "parts_ms": parts.total_ms,
            "in_model_ms": scaled.total_ms,
            "in_model_standalone_conversions_ms": scaled_alone.total_ms,
            "measured_ms": measured,
            "parts_ratio": parts.total_ms / measured,
            "in_model_ratio": scaled.total_ms / measured,
            "standalone_ratio": scaled_alone.total_ms / measured,
            "conversions_fused_ms": by_kind.get("quantize", 0.0) + by_kind.get("dequantize", 0.0),
            "conversions_standalone_ms": sum(
                scaled_alone.by_kind().get(kind, 0.0) for kind in ("quantize", "dequantize")
            ),
            # What the conversions cost inside the model, if the scaled layers and glue are right.
            "conversions_in_model_ms": measured - by_kind.get("layer", 0.0) - by_kind.get("glue", 0.0),
            "parts_by_kind_ms": parts.by_kind(),
            "layers_by_precision_ms": layers_by_precision(parts),
            "measured_repeats_ms": list(timed[label].repeats_ms),
            "parts": [
                {"part": what, "workload": w.key, "label": w.label, "ms": ms} for what, w, ms in parts.parts
            ],
        }
        print(
            f"{name} {label}: parts {parts.total_ms:.2f}, in-model {scaled.total_ms:.2f} (standalone "
            f"conversions {scaled_alone.total_ms:.2f}), measured {measured:.2f} ms",
            flush=True,
        )
    return latencies, {
        "model": name,
        "workloads": summary.total,
        "measured_now": summary.measured,
        "failed": summary.failed,
        "measure_seconds": measure_s,
        "whole_model_seconds": whole_s,
        "mqe_seconds": mqe_s,
        "quiet_gate": measurer.gate.to_json(),
        "retimed": summary.retimed,
        "in_model": scales.to_json(),
        "plans": rows,
    }


@contextmanager
def scratch_board(name: str, arm_runtime: str) -> Iterator[tuple[Board, LatencyDatabase]]:
    """The loopback host board, or ``name`` emulated under qemu with ``arm_runtime``, and a fresh
    database."""
    if name == "host":
        with scratch_host_board("oqa-bench") as pair:
            yield pair
        return
    with (
        tempfile.TemporaryDirectory() as scratch,
        EmulatedBoard(resolve_target(name), arm_runtime) as board,
        LatencyDatabase(Path(scratch) / "bench.sqlite") as db,
    ):
        yield board, db


def main() -> None:
    args = parse_args(
        __doc__,
        repeats=5,
        extra={
            "--models": HOST_MODELS,
            "--board": "host",
            "--arm-runtime": str(SHARED_ARM_RUNTIME),
            "--render": "",
        },
    )
    if args.render:  # the summary of a stored run, written again (no measuring)
        record = json.loads(Path(args.render).read_text())
        write_results(args.out, Path(args.render).stem, record, markdown(record))
        return
    spec = resolve_target(args.board)
    names = [n for n in args.models.split(",") if n]
    load_before = os.getloadavg()  # the host is shared: other work skews both sides of the ratio
    with scratch_board(args.board, args.arm_runtime) as (board, db):
        measured = {n: bench(n, CASES[n](), board, spec, db, args.repeats) for n in names}
        rows = {m.workload.key: m for m in db.measurements() if m.ok}
        emulation = board.emulation
    results = [record for _, record in measured.values()]
    latency_model = _latency_model(names, measured, rows)
    record = {
        **machine_record(spec.tvm_target()),
        "board": args.board,
        "emulation": emulation,
        "timing": {
            "repeat": TIMING.repeat,
            "min_repeat_ms": TIMING.min_repeat_ms,
            "e2e_rounds": args.repeats,
            "measurement": schedule_label("default"),
        },
        "accept_ratio": list(ACCEPT),
        "load_average_1_5_15": {"before": list(load_before), "after": list(os.getloadavg())},
        "results": results,
        "latency_model": latency_model,
    }
    name = "oqa_composition" if emulation is None else f"oqa_composition_{args.board}_emulated"
    write_results(args.out, name, record, markdown(record))


def markdown(record: dict) -> list[str]:
    """The summary of a run's ``record`` (also for ``--render``: a committed JSON rendered again)."""
    results, latency_model, emulation = record["results"], record["latency_model"], record["emulation"]
    repeats = record["timing"]["e2e_rounds"]
    where = "host board (loopback RPC)" if emulation is None else f"{record['board']}, emulated"
    lines = [
        f"# OQA composition: sum of measured parts vs the whole model, {where}",
        "",
    ]
    if emulation is not None:
        lines += [
            f"**Emulated** ({emulation}): these latencies are qemu's, not the board's; they check the "
            "composition's structure (every part built, run and timed on the aarch64 runtime, plans "
            "built whole and timed there), not how a real board's timings compose.",
            "",
        ]
    lines += [
        f"Zero-budget schedule (measurements `{schedule_label('default')}`: each part's kernels timed "
        f"with their weights and output flushed from the caches, input warm), {TIMING.repeat} repeats x "
        f">= {TIMING.min_repeat_ms} ms per timing; end-to-end is the median of {repeats} interleaved "
        "rounds. Every timing, parts and whole models alike, starts once the board runs at its usual "
        "speed (the canary of `ohq_tvm.oqa.quiet`) and is redone if it slowed down meanwhile. "
        "*parts*: the sum of the parts as measured alone; *in-model*: each layer scaled by its "
        "precision's factor, fitted on the uniform fp32 and int8 plans timed whole in a separate run "
        "(`ohq_tvm.oqa.in_model`), conversions timed fused into their layers: what planning uses; "
        "*standalone conv.*: the same with every quantize/dequantize timed as an operator of its own (as "
        "before; factors fitted the same way). The mixed plans were not fitted on; *chosen*: the plans the "
        "ILP, greedy and the bit-ops proxy pick (MQE sensitivity, 2 synthetic batches). "
        f"Accepted when the ratio is in {ACCEPT[0]}..{ACCEPT[1]}.",
        "",
        "| model | plan | layers fp32/int8 | boundaries | parts ms | in-model ms | standalone conv. ms "
        "| measured ms | in-model / measured | standalone conv. / measured |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for result in results:
        for plan, row in result["plans"].items():
            counts = row["counts"]
            tag = " (fitted)" if row["fitted"] else " (chosen)" if row["chosen"] else ""
            lines.append(
                f"| {result['model']} | {plan}{tag} | {counts.get('fp32', 0)}/{counts.get('int8', 0)} | "
                f"{row['boundaries']} | {row['parts_ms']:.2f} | {row['in_model_ms']:.2f} | "
                f"{row['in_model_standalone_conversions_ms']:.2f} | {row['measured_ms']:.2f} | "
                f"{row['in_model_ratio']:.3f} | {row['standalone_ratio']:.3f} |"
            )
    lines += [
        "",
        "Errors of the predictions, |predicted / measured - 1|. *same-rounds factors*: the in-model "
        "prediction with its factors fitted again on the uniform plans as timed in the same interleaved "
        "rounds as the mixed ones: the composition's own error, without the board's drift between the "
        "session that fits the factors (as planning does) and the rounds that check the plans.",
        "",
    ]
    lines += [
        "| model | plans | n | in-model mean | in-model worst | standalone conv. mean "
        "| standalone conv. worst | parts mean | parts worst | same-rounds factors mean "
        "| same-rounds factors worst |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for result in results:
        for label, ratio in same_rounds_ratios(result["plans"]).items():
            result["plans"][label]["same_rounds_ratio"] = ratio
    pooled: dict[str, list[dict]] = {"mixed": [], "chosen": []}
    for result in results:
        held_out = [row for row in result["plans"].values() if not row["fitted"]]
        chosen = [row for row in held_out if row["chosen"]]
        pooled["mixed"] += held_out
        pooled["chosen"] += chosen
        for label, group in (("all mixed", held_out), ("chosen", chosen)):
            lines.append(f"| {result['model']} | {label} | {error_cells(group)}")
    for label, group in (("all mixed", pooled["mixed"]), ("chosen", pooled["chosen"])):
        lines.append(f"| all models | {label} | {error_cells(group)}")
    lines += [
        "",
        "Conversions, ms (the breakdown): per plan, the quantize/dequantize parts as planning now "
        "prices them (fused into their layers), as standalone operators, and what the whole model "
        "leaves for them (measured minus the scaled layers and glue; it also carries the layers' "
        "own error):",
        "",
    ]
    lines += [
        "| model | plan | boundaries | fused | standalone | measured - layers - glue |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for result in results:
        for plan, row in result["plans"].items():
            if row["boundaries"] <= 2:  # uniform plans: the model input and the classifier only
                continue
            lines.append(
                f"| {result['model']} | {plan} | {row['boundaries']} | {row['conversions_fused_ms']:.3f} | "
                f"{row['conversions_standalone_ms']:.3f} | {row['conversions_in_model_ms']:.3f} |"
            )
    lines.append("")
    for result in results:
        scales = ", ".join(f"{p} x{run['scale']:.3f}" for p, run in result["in_model"].items())
        lines.append(f"- {result['model']}: in-model factors {scales}")
    lines.append("")
    for result in results:
        lines.append(
            f"{result['model']}: {result['workloads']} unique workloads measured in "
            f"{result['measure_seconds']:.0f} s, {len(result['failed'])} failed; uniform plans built and "
            f"timed whole in {result['whole_model_seconds']:.0f} s; MQE in {result['mqe_seconds']:.0f} s."
        )
    loads = record["load_average_1_5_15"]
    lines.append(
        "Host load average (1/5/15 min) before: "
        + ", ".join(f"{v:.2f}" for v in loads["before"])
        + "; after: "
        + ", ".join(f"{v:.2f}" for v in loads["after"])
        + "."
    )
    if latency_model:
        lines += [
            "",
            "XGBoost latency model (features: MACs, bytes, shapes, kernel, precision, op kind):",
            "",
        ]
        lines.append(
            f"- {latency_model['cv_folds']}-fold cross-validated MAPE over all {latency_model['rows']} "
            f"measured workloads: {latency_model['cv_mape_percent']:.1f}%"
        )
        for item in latency_model.get("cross_model", []):
            lines.append(
                f"- trained on {item['train']} only, predicting the {item['predicted']} workloads of "
                f"{item['test']} it has not seen: MAPE {item['mape_percent']:.1f}%"
            )
    return lines


def error_cells(rows: list[dict]) -> str:
    """n, then mean and worst |ratio - 1| in percent of the in-model, standalone and parts predictions."""
    if not rows:
        return "0 | | | | | | | | |"
    cells = [str(len(rows))]
    for key in ("in_model_ratio", "standalone_ratio", "parts_ratio", "same_rounds_ratio"):
        errors = [abs(row[key] - 1) * 100 for row in rows]
        cells += [f"{statistics.mean(errors):.1f}%", f"{max(errors):.1f}%"]
    return " | ".join(cells) + " |"


def _latency_model(names, measured, rows) -> dict:
    """CV error over every row, and each model's unseen workloads predicted from the other's rows."""
    if len(rows) < MIN_TRAINING_ROWS:
        return {}
    workloads = [m.workload for m in rows.values()]
    model = LatencyModel.train(workloads, [m.median_ms for m in rows.values()])
    report = {"rows": len(rows), "cv_folds": model.folds, "cv_mape_percent": model.cv_mape_percent}
    cross = []
    for train in names:
        for test in names:
            if train == test:
                continue
            seen = set(measured[train][0])
            train_rows = [rows[k] for k in seen if k in rows]
            unseen = [rows[k] for k in measured[test][0] if k not in seen and k in rows]
            if len(train_rows) < MIN_TRAINING_ROWS or not unseen:
                continue
            fitted = LatencyModel.train([m.workload for m in train_rows], [m.median_ms for m in train_rows])
            predicted = fitted.predict_ms([m.workload for m in unseen])
            actual = np.array([m.median_ms for m in unseen])
            cross.append(
                {
                    "train": train,
                    "test": test,
                    "predicted": len(unseen),
                    "mape_percent": mape(predicted, actual),
                }
            )
    report["cross_model"] = cross
    return report


if __name__ == "__main__":
    with sigterm_as_exit():  # a killed run still takes its loopback board down
        main()
