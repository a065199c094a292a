"""The configs of the ``ohq-tvm`` commands, built from their parsed arguments in this one place."""

from __future__ import annotations

import argparse

from .board import BoardConnection
from .budget import BudgetSpec
from .config import CalibrationConfig, MeasurementConfig, PlanningConfig, TuningConfig, VerificationConfig
from .errors import BudgetError


def board_connection(args: argparse.Namespace) -> BoardConnection:
    """The :class:`~ohq_tvm.board.BoardConnection` of the board arguments (``--tracker``, ``--key``,
    ``--server``, ``--emulated``, ``--arm-runtime``)."""
    return BoardConnection(
        tracker=args.tracker,
        key=args.key,
        server=args.server,
        emulated=args.emulated,
        arm_runtime=args.arm_runtime,
    )


def tuning_config(args: argparse.Namespace) -> TuningConfig:
    """``--trials`` and ``--tuning-dir``."""
    return TuningConfig(trials=args.trials, tuning_dir=args.tuning_dir)


def measurement_config(args: argparse.Namespace) -> MeasurementConfig:
    """``ohq-tvm measure``: ``--db``, ``--precisions``, ``--workers``, ``--schedule``, ``--budget N``."""
    return MeasurementConfig(
        database=args.db,
        precisions=args.precisions,
        workers=args.workers,
        schedule=args.schedule,
        operator_budget=args.budget,
    )


def planning_config(args: argparse.Namespace) -> PlanningConfig:
    """``ohq-tvm plan`` and ``compile --budget``: the budget, ``--db``, ``--precisions``, ``--batches``,
    ``--mqe-data`` and ``--parts-only``."""
    return PlanningConfig(
        budget=_budget(args),
        database=args.db,
        precisions=args.precisions,
        mqe_batches=args.batches,
        mqe_data=args.mqe_data,
        whole_model=not args.parts_only,
    )


def _budget(args: argparse.Namespace) -> BudgetSpec | None:
    """``--budget SPEC``, or ``ohq-tvm plan``'s older single-quantity flags."""
    flags = {
        "latency": None if getattr(args, "latency_ms", None) is None else f"{args.latency_ms}ms",
        "size": None if getattr(args, "size_mb", None) is None else f"{args.size_mb}MB",
        "pareto": None if not getattr(args, "pareto", 0) else str(args.pareto),
    }
    if getattr(args, "latency_ratio", None) is not None:
        flags["latency"] = f"{args.latency_ratio}*fp32"
    given = [f"{name}={value}" for name, value in flags.items() if value is not None]
    if args.budget and given:
        raise BudgetError(
            "give --budget or the --latency-ms/--latency-ratio/--size-mb/--pareto flags, not both"
        )
    text = args.budget or ",".join(given)
    return BudgetSpec.parse(text) if text else None


def calibration_config(args: argparse.Namespace) -> CalibrationConfig:
    """``ohq-tvm compile``'s ``--calibration``, ``--calibration-samples``, ``--normalization`` and
    ``--synthetic``."""
    return CalibrationConfig(
        method=args.calibration,
        samples=args.calibration_samples,
        normalization=args.normalization,
        synthetic=args.synthetic,
    )


def verification_config(args: argparse.Namespace) -> VerificationConfig:
    """``ohq-tvm compile``'s ``--no-verify``, ``--fidelity-samples``, ``--min-agreement`` and
    ``--eval-images``."""
    return VerificationConfig(
        verify=not args.no_verify,
        fidelity_samples=args.fidelity_samples,
        min_agreement=args.min_agreement,
        eval_images=args.eval_images,
    )


__all__ = [
    "board_connection",
    "calibration_config",
    "measurement_config",
    "planning_config",
    "tuning_config",
    "verification_config",
]
