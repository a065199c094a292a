"""The one exception family a user can cause. The CLI prints its message as one line and exits non-zero."""


class OHQError(Exception):
    """A problem with the user's input or environment; the message names the thing and the fix."""


class ModelImportError(OHQError):
    """The ONNX model cannot be read or converted (missing/corrupt file, dynamic shape, unsupported op)."""


class TargetError(OHQError):
    """A target or board description is unknown or malformed."""


class BoardError(OHQError):
    """A board cannot be reached over RPC, or died while in use."""


class BuildError(OHQError):
    """Building or exporting a module failed (e.g. no cross compiler for the target triple)."""


class VerificationError(OHQError):
    """A compiled module ran on the board but its outputs disagree with the reference."""
