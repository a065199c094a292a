"""Code generation: schedule, tune, build, export and verify deployable modules.

Formerly ``ohq_tvm.build``, which still imports as a deprecated alias (:mod:`ohq_tvm.build`).
"""

from .module import SCHEDULES, ExportedModule, build_executable, export_module, sha256_file
from .schedules import build_scheduled, default_cpu_schedule, unscheduled_functions
from .toolchain import Toolchain, find_toolchain, host_arch, triple_arch
from .tune import TaskTuning, TuneResult, TuningProgress, tune_module
from .tuned_build import build_tuned
from .tuning_database import TUNING_DIR_ENV, TuningDatabase, default_tuning_root
from .verify import (
    FP32_TOLERANCE,
    QUANTIZED_TOLERANCE,
    Verification,
    reference_outputs,
    verify_on_board,
    verify_vm,
)

__all__ = [
    "FP32_TOLERANCE",
    "QUANTIZED_TOLERANCE",
    "SCHEDULES",
    "TUNING_DIR_ENV",
    "ExportedModule",
    "TaskTuning",
    "Toolchain",
    "TuneResult",
    "TuningDatabase",
    "TuningProgress",
    "Verification",
    "build_executable",
    "build_scheduled",
    "build_tuned",
    "default_cpu_schedule",
    "default_tuning_root",
    "export_module",
    "find_toolchain",
    "host_arch",
    "reference_outputs",
    "sha256_file",
    "triple_arch",
    "tune_module",
    "unscheduled_functions",
    "verify_on_board",
    "verify_vm",
]
