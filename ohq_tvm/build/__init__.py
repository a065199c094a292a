"""Build, export and verify deployable modules."""

from .module import ExportedModule, build_executable, export_module, sha256_file
from .toolchain import Toolchain, find_toolchain, host_arch, triple_arch
from .verify import Verification, reference_outputs, verify_on_board

__all__ = [
    "ExportedModule",
    "Toolchain",
    "Verification",
    "build_executable",
    "export_module",
    "find_toolchain",
    "host_arch",
    "reference_outputs",
    "sha256_file",
    "triple_arch",
    "verify_on_board",
]
