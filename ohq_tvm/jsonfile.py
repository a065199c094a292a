"""Reading and writing the project's small JSON records (plans, calibrations) with one-line errors."""

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
