"""Reading and writing the project's small JSON records (plans, calibrations, manifests) with one-line
errors, and turning TVM containers into plain JSON values. Every file the project writes goes through
:func:`write_atomic`."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from pathlib import Path
from typing import Any

from .errors import OHQError


def write_atomic(
    path: str | os.PathLike,
    content: str | bytes,
    what: str = "output file",
    *,
    make_parents: bool = True,
    error: type[OHQError] = OHQError,
) -> Path:
    """Write ``content`` to ``path`` through a temporary file in the same folder renamed over it; return
    the path.

    A reader never sees half a file, and a symlink at ``path`` is replaced by the new file rather than
    followed (its target is left as it was). Parent folders are created unless ``make_parents`` is false.
    Raises ``error`` naming ``what`` and the path when the folder is missing (``make_parents=False``) or
    cannot be made, or the file cannot be written there (a folder in its place, no permission).
    """
    target = Path(path)
    data = content.encode() if isinstance(content, str) else content
    if not make_parents and not target.parent.is_dir():
        raise error(f"cannot write {what} {target}: folder {target.parent} does not exist; create it first")
    temp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # os.open applies the umask as a plain open() would (mkstemp's files are private to the owner).
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with os.fdopen(fd, "wb") as stream:
                stream.write(data)
            os.replace(temp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise
    except OSError as err:
        reason = err.strerror or str(err)
        raise error(f"cannot write {what} {target}: {reason}; choose a path in a writable folder") from None
    return target


def make_output_folder(path: str | os.PathLike, error: type[OHQError] = OHQError) -> Path:
    """Create the output folder ``path`` (and its parents) unless it exists; return it. Raises ``error``
    naming the folder when a file is in its place or it cannot be made or written to, so a run fails
    before its slow stages rather than when it writes its results."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise error(f"output folder {folder} is a file, not a folder; give -o a folder (new or existing)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        reason = err.strerror or str(err)
        raise error(f"cannot create output folder {folder}: {reason}; give -o a writable folder") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise error(f"output folder {folder} is not writable; give -o a writable folder")
    return folder


def write_json(
    path: str | os.PathLike, data: Any, what: str = "JSON file", error: type[OHQError] = OHQError
) -> Path:
    """Write ``data`` as indented JSON with :func:`write_atomic` (parent folders created); return the
    path. Raises ``error`` naming ``what`` when the path cannot be written."""
    return write_atomic(path, json.dumps(data, indent=2) + "\n", what, error=error)


def read_json(path: str | os.PathLike, what: str, error: type[OHQError] = OHQError) -> Any:
    """Parse the JSON file at ``path``; ``error`` naming ``what`` the file was meant to be otherwise."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise error(f"{what} file {path} does not exist") from None
    except json.JSONDecodeError as err:
        raise error(f"{what} file {path} is not JSON: {err}") from None


def plain_json(value: object) -> object:
    """TVM containers (``Map``, ``Array``, as in a target's ``export()``) → plain JSON values, so what is
    written or hashed does not depend on how TVM prints them; anything else unknown becomes its string."""
    if isinstance(value, dict) or type(value).__name__ == "Map":
        return {str(k): plain_json(v) for k, v in value.items()}  # type: ignore[union-attr]
    if isinstance(value, (list, tuple)) or type(value).__name__ == "Array":
        return [plain_json(v) for v in value]  # type: ignore[union-attr]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)
