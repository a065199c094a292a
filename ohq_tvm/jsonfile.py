"""Reading and writing the project's small JSON records (plans, calibrations, manifests) with one-line
errors, and turning TVM containers into plain JSON values."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .errors import OHQError


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Write ``data`` as indented JSON, creating parent folders; return the path."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(data, indent=2) + "\n")
    return target


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
