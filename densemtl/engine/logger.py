"""The record of a run as it trains: ``log.jsonl``, TensorBoard scalars and images, ``val_predictions.png``.

A resumed run continues the record of the checkpoint it starts from: the lines of ``log.jsonl`` after the
checkpoint's step (written before the interruption, and about to be written again) are dropped, and so are
TensorBoard's events after it, so every step is recorded once.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from densemtl.atomic import atomic_write
from densemtl.metrics.delta_m import Results


def truncate_log(path: Path, step: int) -> None:
    """Keep the records of ``path`` up to ``step``, and nothing after a line cut short by a crash."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines(keepends=True):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            break
        if not line.endswith("\n") or record.get("step", 0) > step:
            break
        kept.append(line)
    with atomic_write(path) as stream:
        stream.write("".join(kept).encode())


class RunLogger:
    """``log.jsonl`` (every figure, one JSON object a line) and TensorBoard scalars/images; rank 0 only.

    ``resume_step`` None starts a fresh record; a step continues the record of a run resumed from it.
    """

    def __init__(self, run_dir: Path, active: bool, resume_step: int | None = None) -> None:
        self.active = active
        self.run_dir = run_dir
        self.writer = None
        self.stream = None
        if active:
            from torch.utils.tensorboard import SummaryWriter

            run_dir.mkdir(parents=True, exist_ok=True)
            if resume_step is not None:
                truncate_log(run_dir / "log.jsonl", resume_step)
            self.stream = open(run_dir / "log.jsonl", "w" if resume_step is None else "a")
            purge = None if resume_step is None else resume_step + 1
            self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=purge)

    def _write(self, record: dict[str, Any]) -> None:
        self.stream.write(json.dumps(record) + "\n")
        self.stream.flush()

    def scalars(self, kind: str, step: int, figures: dict[str, float]) -> None:
        if not self.active:
            return
        self._write({"kind": kind, "step": step, **figures})
        for key, value in figures.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(f"{kind}/{key}", value, step)

    def results(self, step: int, results: Results, best: dict[str, Any]) -> None:
        if not self.active:
            return
        self._write({"kind": "val", "step": step, "results": results, "best_score": best["score"],
                     "best_step": best["step"]})
        for task, metrics in results.items():
            for metric, value in metrics.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(f"val/{task}/{metric}", value, step)

    def image(self, step: int, grid: np.ndarray | None) -> None:
        """The prediction grid to TensorBoard and, replacing the previous one, ``val_predictions.png``."""
        if self.active and grid is not None:
            self.writer.add_image("val/predictions (image, then target | prediction per task)", grid, step,
                                  dataformats="HWC")
            Image.fromarray(grid).save(self.run_dir / "val_predictions.png")

    def close(self) -> None:
        if self.active:
            self.stream.close()
            self.writer.close()
