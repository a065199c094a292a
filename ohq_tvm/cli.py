"""The ``ohq-tvm`` command: parses arguments, calls the API, prints. Nothing below this module prints."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from typing import NoReturn

from . import models
from .board import NOT_THE_BOARDS, EmulatedBoard, Stopped, sigterm_as_exit
from .cli_configs import (
    board_connection,
    calibration_config,
    planning_config,
    tuning_config,
    verification_config,
)
from .cli_planning import (
    BUDGET_HELP,
    add_mqe_data_argument,
    add_planning_commands,
    board_arguments,
    emulation_note,
    positive_int,
    precision_list,
    print_plan_table,
    tuning_arguments,
    warn_unreliable,
)
from .cli_progress import StageBars
from .codegen.verify import Verification
from .errors import BoardError, OHQError, VerificationError
from .frontend import parse_input_shapes
from .interrupts import watch_interrupts
from .pipeline import compile_model
from .plan import CALIBRATION_METHODS
from .precision import Precision
from .report import prediction_miss
from .samples import NORMALIZATIONS, synthetic_choices
from .targets import list_boards, resolve_target

EXIT_USER_ERROR = 2
EXIT_VERIFICATION_FAILED = 3


def _cmd_targets(args: argparse.Namespace) -> int:
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
    if args.name not in models.MODELS:
        raise OHQError(f"unknown example model {args.name!r}; known: {', '.join(sorted(models.MODELS))}")
    models.save(models.MODELS[args.name](), args.output)
    print(f"wrote {args.output}")
    return 0


def _cmd_compile(args: argparse.Namespace) -> int:
    bars = StageBars()
    try:
        result = compile_model(
            args.model,
            args.target,
            args.output,
            connection=board_connection(args),
            input_shapes=parse_input_shapes(args.input_shape or []),
            precision=args.precision,
            plan=args.plan,
            planning=planning_config(args) if args.budget else None,
            calibration=calibration_config(args),
            verification=verification_config(args),
            tuning=tuning_config(args),
            schedule=args.schedule,
            seed=args.seed,
            progress=bars,
        )
    except VerificationError as err:
        print(f"FAILED verification: {err}", file=sys.stderr)
        return EXIT_VERIFICATION_FAILED
    finally:
        bars.close()
    if result.planning is not None:
        print_plan_table(result.planning, measured_ms=result.measured_ms, emulation=result.emulation)
    print(f"wrote {result.library_path} and {result.manifest_path}")
    if result.report_path is not None:
        print(f"report: {result.report_path} (Pareto plot {result.pareto_path})")
    if result.verification is not None:
        # Never a bare "ok" over a plan chosen from timings that contradict each other.
        status = "verified, planned on unreliable timings" if result.timing_unreliable else "ok"
        print_verification(result.verification, result.emulation, status)
    else:
        print(f"built, not verified: {result.skipped_verification}")
    warn_unreliable(result.planning)
    if result.planning is not None:
        miss = prediction_miss(result.planning.plan.predicted.get("latency_ms"), result.measured_ms)
        if miss is not None:
            print(f"warning: {miss}")
    return 0


def print_verification(verification: Verification, emulation: str | None = None, status: str = "ok") -> None:
    """The verdict of a passed verification (``status``: ``ok`` unless the run has a reason to doubt it):
    the board, the reference, the latency and its spread; a warning line after it when the latency is
    noisy (see :meth:`~ohq_tvm.board.LatencyStats.noisy`)."""
    latency = verification.latency
    timing = f", {latency.median_ms:.3f} ms median ({latency.describe_spread()})" if latency else ""
    print(
        f"{status}: ran on {verification.board} and matched {verification.reference_label}{timing}"
        + emulation_note(emulation)
    )
    warning = latency.noise_warning("the built model") if latency else None
    if warning:
        print(f"warning: {warning}")


def _cmd_board_emulate(args: argparse.Namespace) -> int:
    if args.servers < 1:
        raise BoardError(f"--servers must be at least 1, not {args.servers}")
    spec = resolve_target(args.board)
    board = EmulatedBoard(
        spec, args.arm_runtime, key=args.key, num_servers=args.servers, tracker=args.tracker, cpu=args.cpu
    )
    with board:
        print(
            f"{spec.name} emulated by {args.servers} x `{board.emulation}`, key {board.key!r} at the RPC "
            f"tracker {board.tracker_address} (127.0.0.1 only); {NOT_THE_BOARDS}",
            flush=True,
        )
        print(
            f"use it: ohq-tvm compile MODEL.onnx --target {spec.name} --tracker {board.tracker_address} "
            f"--emulated{'' if args.key is None else f' --key {args.key}'} -o out/   (Ctrl-C stops it)",
            flush=True,
        )
        try:
            while True:
                time.sleep(1.0)
                for index, server in enumerate(board.server_processes):
                    if not server.alive():  # a guest that crashed takes its server with it
                        cause = board.explain_failure() or f"exit status {server.exit_code()}"
                        print(f"server {index} died ({cause}); starting another", flush=True)
                        board.server_processes.remove(server)
                        board.start_server(index)
                if board.tracker_process is not None and not board.tracker_process.alive():
                    raise BoardError(f"the tracker of {board.label} died; emulated servers stopped")
        except KeyboardInterrupt:
            print("stopped", flush=True)
    return 0


class _Parser(argparse.ArgumentParser):
    """Usage errors like every other error a user can cause: one ``error:`` line and exit status 2
    (argparse's own prints the usage first); its subcommands' parsers are of this class too."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USER_ERROR, f"error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ohq-tvm", description="Hardware-aware mixed-precision compilation on Apache TVM.")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("targets", help="list the built-in boards").set_defaults(run=_cmd_targets)

    example = sub.add_parser("example-model", help="write one of the generated example ONNX models")
    example.add_argument("name", help="e.g. tiny_cnn")
    example.add_argument("-o", "--output", required=True, help="path of the .onnx file to write")
    example.set_defaults(run=_cmd_example_model)

    comp = sub.add_parser("compile", help="compile an ONNX model for a board and verify it there")
    comp.add_argument("model", help="path to an .onnx file")
    board_arguments(comp)
    comp.add_argument("-o", "--output", required=True, help="output directory")
    comp.add_argument("--no-verify", action="store_true", help="skip running on the board")
    comp.add_argument("--seed", type=int, default=0, help="seed of the synthetic verification input")
    comp.add_argument(
        "--schedule",
        choices=["default", "none"],
        default="default",
        help="default: parallel, vectorised CPU schedule with no tuning; none: TVM's naive loops",
    )
    tuning_arguments(comp)
    quant = comp.add_argument_group("quantization (default: fp32, no plan)")
    which = quant.add_mutually_exclusive_group()
    which.add_argument(
        "--precision", choices=[p.value for p in Precision], help="every layer in this precision"
    )
    which.add_argument("--plan", metavar="PLAN.json", help="a plan file: one precision per layer")
    which.add_argument(
        "--budget",
        metavar="SPEC",
        help="run the whole OHQ pipeline (measure every candidate on the board, estimate sensitivity, "
        "solve) and build the plan meeting SPEC: " + BUDGET_HELP,
    )
    quant.add_argument("--db", help="measurement database (default: $OHQ_TVM_DB or ~/.cache/ohq-tvm)")
    quant.add_argument(
        "--precisions",
        type=precision_list,
        help="--budget: comma-separated candidates (default: all the board has)",
    )
    quant.add_argument(
        "--batches", type=positive_int, default=4, help="--budget: synthetic batches for MQE (default: 4)"
    )
    add_mqe_data_argument(quant)
    quant.add_argument(
        "--eval-images",
        metavar="DIR",
        help="images or .npy arrays on which a quantized module's top-1 agreement with fp32 is measured",
    )
    quant.add_argument(
        "--fidelity-samples",
        type=int,
        default=8,
        metavar="N",
        help="synthetic inputs on which a quantized module is compared with fp32 (default: 8)",
    )
    quant.add_argument(
        "--min-agreement",
        type=float,
        metavar="X",
        help="fail verification when top-1 agreement with fp32 (on --eval-images if given) is below X",
    )
    quant.add_argument(
        "--calibration",
        choices=CALIBRATION_METHODS,
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
        choices=list(NORMALIZATIONS),
        default="imagenet",
        help="how images in --calibration-samples become tensors (default: imagenet mean/std)",
    )
    quant.add_argument(
        "--synthetic",
        choices=synthetic_choices(),
        default="gaussian",
        help="synthetic calibration data when no samples are given; matched: per-channel input "
        "statistics fitted to the first conv's BatchNormalization; distilled: inputs optimised to "
        "match every BatchNormalization's statistics; inverted: inputs a classifier assigns to each "
        "class in turn (default: gaussian)",
    )
    comp.set_defaults(run=_cmd_compile)

    add_planning_commands(sub)

    board = sub.add_parser("board", help="boards on this machine: emulate an aarch64 board")
    board_sub = board.add_subparsers(dest="action", required=True)
    emulate = board_sub.add_parser(
        "emulate",
        help="serve an aarch64 board emulated by qemu (its instructions and outputs are the board's, its "
        "latencies are not) until Ctrl-C",
    )
    emulate.add_argument("board", help="board name or TOML (see `ohq-tvm targets`), e.g. rk3588")
    emulate.add_argument(
        "--tracker", help="register at this RPC tracker HOST:PORT (default: start one on 127.0.0.1)"
    )
    emulate.add_argument("--servers", type=int, default=1, help="RPC servers to start (default: 1)")
    emulate.add_argument("--key", help="RPC key to register under (default: <board key>-emulated)")
    emulate.add_argument(
        "--cpu",
        help="qemu core instead of the board's (e.g. cortex-a72, to see a module fail on an older core)",
    )
    emulate.add_argument(
        "--arm-runtime",
        metavar="DIR",
        help="folder of TVM's RPC server built for aarch64 (default: $OHQ_TVM_ARM_RUNTIME)",
    )
    emulate.set_defaults(run=_cmd_board_emulate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with sigterm_as_exit(), watch_interrupts():
            return args.run(args)
    except OHQError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Stopped as stop:  # SIGTERM, SIGHUP: every board and temporary folder is gone by now
        print(f"stopped by {stop.signal_name}", file=sys.stderr)
        return int(stop.code)


if __name__ == "__main__":
    sys.exit(main())
