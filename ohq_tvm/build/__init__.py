"""Build, export and verify deployable modules."""

from .module import SCHEDULES, ExportedModule, build_executable, export_module, sha256_file
from .schedules import build_scheduled, default_cpu_schedule, unscheduled_functions
from .toolchain import Toolchain, find_toolchain, host_arch, triple_arch
from .verify import FP32_TOLERANCE, QUANTIZED_TOLERANCE, Verification, reference_outputs, verify_on_board

__all__ = [
    "FP32_TOLERANCE",
    "QUANTIZED_TOLERANCE",
    "SCHEDULES",
    "ExportedModule",
    "Toolchain",
    "Verification",
    "build_executable",
    "build_scheduled",
    "default_cpu_schedule",
    "export_module",
    "find_toolchain",
    "host_arch",
    "reference_outputs",
    "sha256_file",
    "triple_arch",
    "unscheduled_functions",
    "verify_on_board",
]
