"""Deprecated alias of :mod:`ohq_tvm.codegen`, the package's old name, kept for existing TVM build scripts.

``ohq_tvm.build`` was renamed because tools and ignore patterns skip folders named ``build``. This plain
module (not a folder, so nothing named ``build/`` is left in the source tree) re-exports
:mod:`ohq_tvm.codegen` and registers each of its submodules under the old dotted name in ``sys.modules``:
``import ohq_tvm.build.verify`` and ``from ohq_tvm.build import find_toolchain`` give the very objects
``ohq_tvm.codegen`` holds (same classes, same module state), not copies. Importing it raises a
``DeprecationWarning`` naming the new module, attributed to the importing line (``stacklevel=2``: the
warnings machinery skips importlib's own frames), so Python's default filters show it to a script's
``__main__``.
"""

from __future__ import annotations

import sys
import warnings

from . import codegen
from .codegen import *  # noqa: F403  (the old package's names, re-exported)
from .codegen import (
    conv_schedule,
    elf,
    fidelity,
    module,
    schedules,
    toolchain,
    tune,
    tune_builder,
    tuned_build,
    tuning_database,
    verify,
)

# The submodules the package had under its old name (new ones get no old name).
RENAMED_SUBMODULES = {
    "conv_schedule": conv_schedule,
    "elf": elf,
    "fidelity": fidelity,
    "module": module,
    "schedules": schedules,
    "toolchain": toolchain,
    "tune": tune,
    "tune_builder": tune_builder,
    "tuned_build": tuned_build,
    "tuning_database": tuning_database,
    "verify": verify,
}

__all__ = list(codegen.__all__)

for _name, _submodule in RENAMED_SUBMODULES.items():
    sys.modules[f"{__name__}.{_name}"] = _submodule

warnings.warn(
    "ohq_tvm.build is deprecated: it was renamed ohq_tvm.codegen (import ohq_tvm.codegen, "
    "ohq_tvm.codegen.verify, ... instead)",
    DeprecationWarning,
    stacklevel=2,
)
