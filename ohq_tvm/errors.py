"""The one exception family a user can cause. The CLI prints its message as one line and exits non-zero.

Each class is registered with TVM's FFI so that one raised inside a pass (which TVM calls through its C++
pass manager) reaches the caller as the same type, not as a generic ``RuntimeError``.
"""

from tvm_ffi import register_error


@register_error
class OHQError(Exception):
    """A problem with the user's input or environment; the message names the thing and the fix."""


@register_error
class ConfigError(OHQError):
    """A config value outside what it may be (a count below its minimum, an unknown choice)."""


@register_error
class ModelImportError(OHQError):
    """The ONNX model cannot be read or converted (missing/corrupt file, dynamic shape, unsupported op)."""


@register_error
class TargetError(OHQError):
    """A target or board description is unknown or malformed."""


@register_error
class BoardError(OHQError):
    """A board cannot be reached over RPC, or died while in use."""


@register_error
class BuildError(OHQError):
    """Building or exporting a module failed (e.g. no cross compiler for the target triple)."""


@register_error
class TuningError(BuildError):
    """MetaSchedule tuning cannot run: an unusable tuning database, or no candidate could be measured."""


@register_error
class PlanError(OHQError):
    """A plan that does not fit the model or the board, or no plan meets the budgets."""


@register_error
class BudgetError(OHQError):
    """A budget specification that cannot be read or resolved."""


@register_error
class VerificationError(OHQError):
    """A compiled module ran on the board but its outputs disagree with the reference."""
