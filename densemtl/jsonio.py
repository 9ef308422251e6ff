"""Figures written as JSON files (results, evaluations, benches, reports): one helper so every file looks
alike and none is ever seen half-written."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from densemtl.atomic import atomic_write


def write_json(data: Any, path: str | Path) -> Path:
    """Write ``data`` as indented JSON to ``path`` atomically (parent folders created); returns the path."""
    path = Path(path)
    with atomic_write(path) as stream:
        stream.write((json.dumps(data, indent=2) + "\n").encode())
    return path
