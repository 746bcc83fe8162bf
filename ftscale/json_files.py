"""Read a JSON file a user or another tool wrote, turning every way it can be unreadable into one error."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ftscale.errors import FtscaleError, first_line


def read_json(path: Path, error: type[FtscaleError], advice: str = "") -> Any:
    """The parsed content of `path`; `error` naming the file if it is missing, not UTF-8, not JSON, nested too
    deeply or holding numbers Python refuses to parse (json raises ValueError or RecursionError for those)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError, RecursionError) as e:
        raise error(f"{path}: not readable JSON ({first_line(e)}){advice}") from None
