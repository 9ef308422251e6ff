"""Figures written as JSON files (benchmarks, evaluations, bench): one helper so every file looks alike."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_json(data: Any, path: str | Path) -> Path:
    """Write ``data`` as indented JSON to ``path`` (parent folders created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path
