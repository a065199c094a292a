"""``ohq-tvm measure``, ``plan`` and ``db``: the OQA / MQE / ILP stages on the command line (thin, like
:mod:`ohq_tvm.cli`, which registers them)."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from .board import NOT_THE_BOARDS
from .cli_configs import board_connection, measurement_config, planning_config, tuning_config
from .cli_progress import StageBars
from .errors import OHQError
from .frontend import load_onnx, parse_input_shapes
from .jsonfile import write_atomic, write_json
from .oqa import LatencyDatabase, TimingConfig
from .oqa.run import measure_model
from .planner import default_sensitivity_cache, plan_model
from .precision import Precision
from .samples import AUTO_SYNTHETIC, synthetic_choices


def positive_int(text: str) -> int:
    """An argument that counts something (workers, operators, batches): a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {value}")
    return value


def precision_list(text: str) -> list[Precision]:
    """``--precisions``: comma-separated known precision names, none of them empty (an empty list would
    otherwise read as "all the board has")."""
    names = [name.strip() for name in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(
            f"{text!r} has an empty precision name; give a comma-separated list such as fp32,int8"
        )
    try:
        return [Precision.parse(name) for name in names]
    except OHQError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def emulation_note(emulation: str | None) -> str:
    """What the CLI appends to a latency taken on an emulated board."""
    return f" ({NOT_THE_BOARDS}: {emulation})" if emulation else ""


def _format_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _cmd_measure(args: argparse.Namespace) -> int:
    asked = {"repeat": args.repeat, "min_repeat_ms": args.min_repeat_ms}
    timing = TimingConfig(**{name: value for name, value in asked.items() if value is not None})
    bars = StageBars()
    try:
        result = measure_model(
            args.model,
            args.target,
            connection=board_connection(args),
            input_shapes=parse_input_shapes(args.input_shape or []),
            measurement=measurement_config(args),
            tuning=tuning_config(args),
            timing=timing,
            progress=bars.measured,
            on_plan=bars.measuring,
            tuning_progress=bars.tuning,
        )
    finally:
        bars.close()
    rows = result.layer_table()
    columns = list(dict.fromkeys(p for row in rows for p in row["latency_ms"]))
    header = ["layer", "op", *[f"{c} ms" for c in columns], "quantize ms", "dequantize ms"]
    table = [header]
    for row in rows:
        cells = [
            ("~" if c in row["predicted"] else "") + _format_ms(row["latency_ms"][c])
            if c in row["latency_ms"]
            else ""
            for c in columns
        ]
        table.append(
            [
                row["layer"],
                row["op"],
                *cells,
                _format_ms(row["quantize_ms"]),
                _format_ms(row["dequantize_ms"]),
            ]
        )
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    for line in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)))
    summary = result.summary
    if summary.predicted_ms:
        error = f"{summary.model_mape_percent:.1f}%" if summary.model_mape_percent is not None else "n/a"
        print(
            f"~: {len(summary.predicted_ms)} operators predicted by the latency model, not measured "
            f"(its cross-validated MAPE on this board: {error}); rerun without --budget to measure them"
        )
    print(
        f"glue (always fp32): {result.glue_ms():.4f} ms over {len(result.workloads.glue)} ops\n"
        f"board {summary.board} [{summary.fingerprint}]: measured {summary.measured}, reused "
        f"{summary.reused}, failed {len(summary.failed)}; database {result.database_path}"
        + emulation_note(summary.emulation)
    )
    return 1 if summary.failed else 0


def _plan_row(name: str, plan) -> list[str]:
    p = plan.predicted
    counts = plan.counts_text(compact=True)
    return [name, f"{p['latency_ms']:.3f}", f"{p['size_bytes'] / 1e6:.3f}", f"{p['sensitivity']:.3e}", counts]


def _print_table(rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))


def print_plan_table(result, measured_ms: float | None = None, emulation: str | None = None) -> None:
    """The chosen plan against its baselines."""
    rows = [
        ["plan", "latency ms", "weights MB", "sensitivity", "precisions"],
        _plan_row("chosen", result.plan),
    ]
    rows += [_plan_row(name, plan) for name, plan in result.baselines.items()]
    _print_table(rows)
    if measured_ms is not None:
        predicted = result.plan.predicted["latency_ms"]
        print(
            f"chosen plan on the board: {measured_ms:.3f} ms measured, {predicted:.3f} ms predicted"
            + emulation_note(emulation)
        )


def warn_unreliable(planning) -> None:
    """The last line of a run whose plan was chosen from board timings that contradict each other."""
    if planning is not None and planning.timing_unreliable:
        print(f"warning: {planning.timing_unreliable}")


def _cmd_plan(args: argparse.Namespace) -> int:
    bars = StageBars()
    try:
        imported = load_onnx(args.model, parse_input_shapes(args.input_shape or []))
        for note in imported.notes:
            bars.say(note)
        planning = planning_config(args)
        cache = default_sensitivity_cache(planning.database, imported)
        result = plan_model(
            imported,
            args.target,
            connection=board_connection(args),
            planning=replace(planning, sensitivity_cache=cache),
            progress=bars,
        )
    finally:
        bars.close()
    out = Path(args.output)
    result.plan.save(out)
    result.sensitivity.save(out.with_name(out.stem + ".sensitivity.json"))
    print_plan_table(result)
    if result.frontier:
        frontier = out.with_name(out.stem + ".frontier.json")
        write_json(frontier, [p.to_json() for p in result.frontier], "frontier")
        print("Pareto frontier (latency vs sensitivity):")
        _print_table(
            [["#", "latency ms", "weights MB", "sensitivity", "precisions"]]
            + [_plan_row(str(i), p) for i, p in enumerate(result.frontier)]
        )
    print(f"wrote {out} (compile it with `ohq-tvm compile MODEL --plan {out}`)")
    warn_unreliable(result)
    return 0


def _cmd_db(args: argparse.Namespace) -> int:
    with LatencyDatabase(args.db, create=False) as db:  # reading or clearing it never makes one
        if args.action == "show":
            boards = db.boards()
            if not boards:
                print(f"{db.path}: empty")
            for board in boards:
                device = board["description"].get("device", {})
                emulated = board["description"].get("emulated")
                print(
                    f"{board['fingerprint']}  {board['label']}  {board['rows']} rows  "
                    f"key={board['description'].get('key')}  cpu={device.get('cpu', '?')}"
                    + (f"  emulated by {emulated}: latencies are not the board's" if emulated else "")
                )
                if args.verbose:
                    for m in db.measurements(board["fingerprint"]):
                        value = _format_ms(m.median_ms) if m.ok else f"failed: {m.error}"
                        print(f"    {m.workload.key}  {m.workload.label:60s}  {value}")
        elif args.action == "export":
            rows = [m.to_json() for m in db.measurements(args.board)]
            text = json.dumps({"boards": db.boards(), "measurements": rows}, indent=2)
            if args.output:
                write_atomic(args.output, text + "\n", "export file", make_parents=False)
                print(f"wrote {len(rows)} measurements to {args.output}")
            else:
                print(text)
        else:
            count = db.clear(args.board)
            print(f"deleted {count} measurements from {db.path}")
    return 0


def tuning_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--trials",
        type=int,
        default=0,
        metavar="N",
        help="tune with MetaSchedule, measuring up to N candidates on the board; functions already in "
        "the tuning database are not measured again (default: 0, no tuning)",
    )
    parser.add_argument(
        "--tuning-dir",
        metavar="DIR",
        help="root of the per-target tuning databases (default: $OHQ_TVM_TUNING_DIR or "
        "~/.cache/ohq-tvm/tuning)",
    )


BUDGET_HELP = (
    "what the plan must meet, comma-separated: latency=5ms, latency=0.8*int8 (a factor times the "
    "latency of the fp32 or a uniform plan, as timed whole on the board), size=2MB, size=0.5*fp32 "
    "(weight bytes), memory=512KB, memory=0.5*fp32 (peak per-layer weights + input + output), "
    "pareto[=N] (the frontier; alone: build its knee)"
)


def add_mqe_data_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--mqe-data",
        choices=synthetic_choices(),
        default=AUTO_SYNTHETIC,
        help="synthetic data MQE scores layers on; auto: distilled (inputs optimised until every "
        "BatchNormalization sees its training statistics) when the ONNX file has BatchNormalization "
        "nodes, else inverted (inputs the classifier assigns to each class in turn) for a model with "
        "one [batch, classes] output, else gaussian (default: auto)",
    )
    parser.add_argument(
        "--parts-only",
        action="store_true",
        help="predict plans from the operators as measured alone, without timing the uniform plans "
        "whole on the board to scale each precision's layers to what they cost inside the model",
    )


def board_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--target",
        "-t",
        default="host",
        help="board name (see `ohq-tvm targets`), board TOML path, target triple, "
        "or TVM target JSON (default: host)",
    )
    parser.add_argument("--tracker", help="RPC tracker HOST:PORT (default: a loopback host board)")
    parser.add_argument("--key", help="RPC key of the board at the tracker (default: the target's)")
    parser.add_argument("--server", help="a single RPC server HOST:PORT, without a tracker")
    parser.add_argument(
        "--emulated",
        action="store_true",
        help="run on the board emulated on this machine (qemu-aarch64 with the board's core; its latencies "
        "are not the board's); with --tracker, on emulated servers registered there (`ohq-tvm board "
        "emulate`); the key defaults to <board key>-emulated",
    )
    parser.add_argument(
        "--arm-runtime",
        metavar="DIR",
        help="--emulated: folder of TVM's RPC server built for aarch64 (tvm_rpc and its libtvm_*.so; "
        "default: $OHQ_TVM_ARM_RUNTIME)",
    )
    parser.add_argument(
        "--input-shape",
        action="append",
        metavar="NAME=D0,D1,...",
        help="static shape for an input with dynamic dimensions (repeatable)",
    )


def add_planning_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``measure``, ``plan`` and ``db`` on the ``ohq-tvm`` parser."""
    meas = sub.add_parser(
        "measure", help="time every candidate operator of a model on the board, into the database"
    )
    meas.add_argument("model", help="path to an .onnx file")
    board_arguments(meas)
    meas.add_argument("--db", help="measurement database (default: $OHQ_TVM_DB or ~/.cache/ohq-tvm)")
    meas.add_argument(
        "--precisions",
        type=precision_list,
        help="comma-separated candidates, e.g. fp32,int8 (default: all the board has)",
    )
    meas.add_argument("--repeat", type=int, help="timed repeats per operator (default: $OHQ_TVM_REPEAT or 5)")
    meas.add_argument(
        "--min-repeat-ms",
        type=int,
        help="minimum length of one repeat (default: $OHQ_TVM_MIN_REPEAT_MS or 40 ms)",
    )
    meas.add_argument(
        "--workers", type=positive_int, help="parallel sessions (default: idle servers under the key)"
    )
    meas.add_argument(
        "--schedule",
        choices=["default", "none"],
        default="default",
        help="how operators are built (as for compile); results are stored per schedule",
    )
    meas.add_argument(
        "--budget",
        type=positive_int,
        metavar="N",
        help="measure at most N operators now, slowest-predicted first; predict the rest",
    )
    tuning_arguments(meas)
    meas.set_defaults(run=_cmd_measure)

    plan = sub.add_parser(
        "plan", help="choose each layer's precision from latency measured on the board and MQE sensitivity"
    )
    plan.add_argument("model", help="path to an .onnx file")
    board_arguments(plan)
    plan.add_argument("--db", help="measurement database (default: $OHQ_TVM_DB or ~/.cache/ohq-tvm)")
    plan.add_argument(
        "--precisions", type=precision_list, help="comma-separated candidates (default: all the board has)"
    )
    budget = plan.add_mutually_exclusive_group()
    budget.add_argument("--latency-ms", type=float, help="latency budget in milliseconds")
    budget.add_argument("--latency-ratio", type=float, help="latency budget as a fraction of the fp32 plan's")
    plan.add_argument("--size-mb", type=float, help="weight size budget in MB")
    plan.add_argument("--budget", metavar="SPEC", help=BUDGET_HELP)
    plan.add_argument(
        "--batches", type=positive_int, default=4, help="synthetic batches for MQE (default: 4)"
    )
    add_mqe_data_argument(plan)
    plan.add_argument(
        "--pareto", type=int, default=0, metavar="N", help="also sweep N budgets for the frontier"
    )
    plan.add_argument("-o", "--output", required=True, help="plan JSON to write")
    plan.set_defaults(run=_cmd_plan)

    db = sub.add_parser("db", help="show, export or clear the measurement database")
    db.add_argument("action", choices=["show", "export", "clear"])
    db.add_argument("--db", help="database path (default: $OHQ_TVM_DB or ~/.cache/ohq-tvm)")
    db.add_argument("--board", help="only this board fingerprint (export, clear)")
    db.add_argument("-o", "--output", help="export: write JSON here instead of stdout")
    db.add_argument("-v", "--verbose", action="store_true", help="show: list every measurement")
    db.set_defaults(run=_cmd_db)
