"""ohq-tvm: hardware-aware mixed-precision quantization on Apache TVM."""

from .errors import (
    BoardError,
    BudgetError,
    BuildError,
    ConfigError,
    ModelImportError,
    OHQError,
    PlanError,
    TargetError,
    TuningError,
    VerificationError,
)
from .precision import Precision

__version__ = "0.1.0"


_CONFIGS = {"CalibrationConfig", "MeasurementConfig", "PlanningConfig", "TuningConfig", "VerificationConfig"}


def __getattr__(name: str):
    # `import ohq_tvm` stays light (no TVM import) until the pipeline is actually used.
    if name in {"compile_model", "CompileResult"}:
        from . import pipeline

        return getattr(pipeline, name)
    if name in _CONFIGS:
        from . import config

        return getattr(config, name)
    if name == "BoardConnection":
        from .board import BoardConnection

        return BoardConnection
    raise AttributeError(f"module 'ohq_tvm' has no attribute {name!r}")


__all__ = [
    "BoardConnection",
    "BoardError",
    "BudgetError",
    "BuildError",
    "CalibrationConfig",
    "CompileResult",
    "ConfigError",
    "MeasurementConfig",
    "ModelImportError",
    "OHQError",
    "PlanError",
    "PlanningConfig",
    "Precision",
    "TargetError",
    "TuningConfig",
    "TuningError",
    "VerificationConfig",
    "VerificationError",
    "compile_model",
]
