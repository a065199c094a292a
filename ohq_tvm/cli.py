"""The ``ohq-tvm`` command: parses arguments, calls the API, prints. Nothing below this module prints."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .errors import OHQError
from .precision import Precision

EXIT_USER_ERROR = 2
EXIT_VERIFICATION_FAILED = 3


def _cmd_targets(args: argparse.Namespace) -> int:
    from .targets import list_boards

    boards = list_boards()
    rows = [("board", "triple", "cpu", "precisions", "rpc key", "description")]
    for b in boards:
        rows.append(
            (
                b.name,
                str(b.target_config.get("mtriple", "")),
                str(b.target_config.get("mcpu", "")),
                ",".join(p.value for p in b.precisions),
                b.rpc_key,
                b.description,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)) + "  " + row[-1])
    return 0


def _cmd_example_model(args: argparse.Namespace) -> int:
    from . import models

    if args.name not in models.MODELS:
        raise OHQError(f"unknown example model {args.name!r}; known: {', '.join(sorted(models.MODELS))}")
    models.save(models.MODELS[args.name](), args.output)
    print(f"wrote {args.output}")
    return 0


def _cmd_compile(args: argparse.Namespace) -> int:
    from .errors import VerificationError
    from .frontend import parse_input_shapes
    from .pipeline import compile_model

    shapes = parse_input_shapes(args.input_shape or [])
    bar = _TuningBar()
    try:
        result = compile_model(
            args.model,
            args.target,
            args.output,
            tracker=args.tracker,
            key=args.key,
            server=args.server,
            input_shapes=shapes,
            verify=not args.no_verify,
            schedule=args.schedule,
            seed=args.seed,
            precision=args.precision,
            plan=args.plan,
            calibration_method=args.calibration,
            calibration_samples=args.calibration_samples,
            normalization=args.normalization,
            synthetic=args.synthetic,
            trials=args.trials,
            tuning_dir=args.tuning_dir,
            progress=bar.say,
            tuning_progress=bar.update,
        )
    except VerificationError as err:
        print(f"FAILED verification: {err}", file=sys.stderr)
        return EXIT_VERIFICATION_FAILED
    finally:
        bar.close()
    print(f"wrote {result.library_path} and {result.manifest_path}")
    if result.verification is not None:
        latency = result.verification.latency
        timing = f", {latency.median_ms:.3f} ms median" if latency else ""
        reference = result.verification.reference_label
        print(f"ok: ran on {result.verification.board} and matched {reference}{timing}")
    else:
        print(f"built, not verified: {result.skipped_verification}")
    return 0


class _TuningBar:
    """A tqdm bar over the tuning budget, opened when the search starts; stage messages close it."""

    def __init__(self) -> None:
        self.bar = None

    def say(self, message: str) -> None:
        if self.bar is not None:
            self.close()
        print(f"  {message}", flush=True)

    def update(self, event) -> None:
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=event.trials_total, unit="trial", desc="  tuning")
        if event.task:
            best = "-" if event.best_ms is None else f"{event.best_ms:.4f} ms"
            self.bar.set_postfix_str(f"{event.task[:32]} best {best}", refresh=False)
        self.bar.update(min(event.trials_done, event.trials_total) - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _board_options(args: argparse.Namespace) -> dict:
    """Where the board is, which precisions and input shapes: shared by measure and plan."""
    from .frontend import parse_input_shapes

    return {
        "tracker": args.tracker,
        "key": args.key,
        "server": args.server,
        "database": args.db,
        "precisions": [p for p in (args.precisions or "").split(",") if p] or None,
        "input_shapes": parse_input_shapes(args.input_shape or []),
    }


def _format_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _cmd_measure(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .oqa import TimingConfig
    from .oqa.run import measure_model

    bar: list[tqdm] = []

    def on_plan(total: int, to_measure: int) -> None:
        print(f"  {total} unique workloads, {total - to_measure} already in the database", flush=True)
        bar.append(tqdm(total=to_measure, unit="op", desc="measuring", disable=to_measure == 0))

    def progress(event) -> None:
        if event.status == "retry":
            bar[0].write(f"  retrying {event.workload.label}: {event.error}")
            return
        if event.status == "failed":
            bar[0].write(f"  FAILED {event.workload.label}: {event.error}")
        bar[0].set_postfix_str(event.workload.label[:40], refresh=False)
        bar[0].update(1)

    timing = TimingConfig(repeat=args.repeat, min_repeat_ms=args.min_repeat_ms)
    try:
        result = measure_model(
            args.model,
            args.target,
            **_board_options(args),
            timing=timing,
            workers=args.workers,
            budget=args.budget,
            schedule=args.schedule,
            progress=progress,
            on_plan=on_plan,
        )
    finally:
        for b in bar:
            b.close()
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
    )
    return 1 if summary.failed else 0


def _plan_row(name: str, plan) -> list[str]:
    p = plan.predicted
    counts = " ".join(f"{n}x{precision}" for precision, n in sorted(plan.counts().items()))
    return [name, f"{p['latency_ms']:.3f}", f"{p['size_bytes'] / 1e6:.3f}", f"{p['sensitivity']:.3e}", counts]


def _print_table(rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))


def _cmd_plan(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .jsonfile import write_json
    from .planner import plan_model

    result = plan_model(
        args.model,
        args.target,
        **_board_options(args),
        latency_ms=args.latency_ms,
        latency_ratio=args.latency_ratio,
        size_bytes=args.size_mb * 1e6 if args.size_mb is not None else None,
        num_batches=args.batches,
        pareto_points=args.pareto,
        say=lambda message: print(f"  {message}", flush=True),
    )
    out = Path(args.output)
    result.plan.save(out)
    result.sensitivity.save(out.with_name(out.stem + ".sensitivity.json"))
    rows = [
        ["plan", "latency ms", "weights MB", "sensitivity", "precisions"],
        _plan_row("chosen", result.plan),
    ]
    rows += [_plan_row(name, plan) for name, plan in result.baselines.items()]
    _print_table(rows)
    if result.frontier:
        write_json(out.with_name(out.stem + ".frontier.json"), [p.to_json() for p in result.frontier])
        print("Pareto frontier (latency vs sensitivity):")
        _print_table(
            [["#", "latency ms", "weights MB", "sensitivity", "precisions"]]
            + [_plan_row(str(i), p) for i, p in enumerate(result.frontier)]
        )
    print(f"wrote {out} (compile it with `ohq-tvm compile MODEL --plan {out}`)")
    return 0


def _cmd_db(args: argparse.Namespace) -> int:
    import json

    from .oqa import LatencyDatabase

    with LatencyDatabase(args.db) as db:
        if args.action == "show":
            boards = db.boards()
            if not boards:
                print(f"{db.path}: empty")
            for board in boards:
                device = board["description"].get("device", {})
                print(
                    f"{board['fingerprint']}  {board['label']}  {board['rows']} rows  "
                    f"key={board['description'].get('key')}  cpu={device.get('cpu', '?')}"
                )
                if args.verbose:
                    for m in db.measurements(board["fingerprint"]):
                        value = _format_ms(m.median_ms) if m.ok else f"failed: {m.error}"
                        print(f"    {m.workload.key}  {m.workload.label:60s}  {value}")
        elif args.action == "export":
            rows = [m.to_json() for m in db.measurements(args.board)]
            text = json.dumps({"boards": db.boards(), "measurements": rows}, indent=2)
            if args.output:
                with open(args.output, "w") as stream:
                    stream.write(text + "\n")
                print(f"wrote {len(rows)} measurements to {args.output}")
            else:
                print(text)
        else:
            count = db.clear(args.board)
            print(f"deleted {count} measurements from {db.path}")
    return 0


def _board_arguments(parser: argparse.ArgumentParser) -> None:
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
        "--input-shape",
        action="append",
        metavar="NAME=D0,D1,...",
        help="static shape for an input with dynamic dimensions (repeatable)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ohq-tvm", description="Hardware-aware mixed-precision compilation on Apache TVM."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("targets", help="list the built-in boards").set_defaults(run=_cmd_targets)

    example = sub.add_parser("example-model", help="write one of the generated example ONNX models")
    example.add_argument("name", help="e.g. tiny_cnn")
    example.add_argument("-o", "--output", required=True, help="path of the .onnx file to write")
    example.set_defaults(run=_cmd_example_model)

    comp = sub.add_parser("compile", help="compile an ONNX model for a board and verify it there")
    comp.add_argument("model", help="path to an .onnx file")
    _board_arguments(comp)
    comp.add_argument("-o", "--output", required=True, help="output directory")
    comp.add_argument("--no-verify", action="store_true", help="skip running on the board")
    comp.add_argument("--seed", type=int, default=0, help="seed of the synthetic verification input")
    comp.add_argument(
        "--schedule",
        choices=["default", "none"],
        default="default",
        help="default: parallel, vectorised CPU schedule with no tuning; none: TVM's naive loops",
    )
    comp.add_argument(
        "--trials",
        type=int,
        default=0,
        metavar="N",
        help="tune with MetaSchedule, measuring up to N candidates on the board; functions already in "
        "the tuning database are not measured again (default: 0, no tuning)",
    )
    comp.add_argument(
        "--tuning-dir",
        metavar="DIR",
        help="root of the per-target tuning databases (default: $OHQ_TVM_TUNING_DIR or "
        "~/.cache/ohq-tvm/tuning)",
    )
    quant = comp.add_argument_group("quantization (default: fp32, no plan)")
    which = quant.add_mutually_exclusive_group()
    which.add_argument(
        "--precision", choices=[p.value for p in Precision], help="every layer in this precision"
    )
    which.add_argument("--plan", metavar="PLAN.json", help="a plan file: one precision per layer")
    quant.add_argument(
        "--calibration",
        choices=["minmax", "percentile", "entropy"],
        default="minmax",
        help="how integer layers' activation ranges are chosen (default: minmax)",
    )
    quant.add_argument(
        "--calibration-samples",
        metavar="DIR",
        help="folder of .npy arrays or images to calibrate on (default: synthetic Gaussian inputs)",
    )
    quant.add_argument(
        "--normalization",
        choices=["imagenet", "tf", "unit"],
        default="imagenet",
        help="how images in --calibration-samples become tensors (default: imagenet mean/std)",
    )
    quant.add_argument(
        "--synthetic",
        choices=["gaussian", "uniform", "matched"],
        default="gaussian",
        help="synthetic calibration data when no samples are given; matched: per-channel input "
        "statistics fitted to the first conv's BatchNormalization (default: gaussian)",
    )
    comp.set_defaults(run=_cmd_compile)

    meas = sub.add_parser(
        "measure", help="time every candidate operator of a model on the board, into the database"
    )
    meas.add_argument("model", help="path to an .onnx file")
    _board_arguments(meas)
    meas.add_argument("--db", help="measurement database (default: $OHQ_TVM_DB or ~/.cache/ohq-tvm)")
    meas.add_argument(
        "--precisions", help="comma-separated candidates, e.g. fp32,int8 (default: all the board has)"
    )
    meas.add_argument("--repeat", type=int, default=5, help="timed repeats per operator (default: 5)")
    meas.add_argument(
        "--min-repeat-ms", type=int, default=40, help="minimum length of one repeat (default: 40 ms)"
    )
    meas.add_argument("--workers", type=int, help="parallel sessions (default: idle servers under the key)")
    meas.add_argument(
        "--schedule",
        choices=["default", "none"],
        default="default",
        help="how operators are built (as for compile); results are stored per schedule",
    )
    meas.add_argument(
        "--budget",
        type=int,
        help="measure at most N operators now, slowest-predicted first; predict the rest",
    )
    meas.set_defaults(run=_cmd_measure)

    plan = sub.add_parser(
        "plan", help="choose each layer's precision from latency measured on the board and MQE sensitivity"
    )
    plan.add_argument("model", help="path to an .onnx file")
    _board_arguments(plan)
    plan.add_argument("--db", help="measurement database (default: $OHQ_TVM_DB or ~/.cache/ohq-tvm)")
    plan.add_argument("--precisions", help="comma-separated candidates (default: all the board has)")
    budget = plan.add_mutually_exclusive_group()
    budget.add_argument("--latency-ms", type=float, help="latency budget in milliseconds")
    budget.add_argument("--latency-ratio", type=float, help="latency budget as a fraction of the fp32 plan's")
    plan.add_argument("--size-mb", type=float, help="weight size budget in MB")
    plan.add_argument("--batches", type=int, default=4, help="synthetic batches for MQE (default: 4)")
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from .board import sigterm_as_exit

    args = build_parser().parse_args(argv)
    try:
        with sigterm_as_exit():
            return args.run(args)
    except OHQError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
