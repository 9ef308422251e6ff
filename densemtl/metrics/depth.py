"""Depth: errors pooled over every valid pixel of the split (valid = gt > 0), no median scaling.

``rmse`` (metres) = sqrt(sum of squared errors / number of valid pixels of the split), as the
multi-task field reports it; ``abs_rel`` = mean |p - g| / g; ``log10`` = mean |log10 p - log10 g|;
``delta1..3`` = percentage of pixels with max(p/g, g/p) < 1.25^k. Predictions are first clamped to
at least 1e-9 m, as the reference code does before every figure (Multi-Task-Learning-PyTorch's and
TaskPrompter's ``evaluation/eval_depth.py`` set ``pred[pred <= 0] = 1e-9``; InvPT saves ``max(p, 0)``):
a negative saved depth counts as zero depth, not as its value.
"""

from __future__ import annotations

import numpy as np
import torch

from densemtl.arrays import all_finite, as_numpy
from densemtl.metrics.base import CountMetric, check_shapes

MIN_DEPTH = 1e-9


def _flat(depth: torch.Tensor | np.ndarray) -> np.ndarray:
    """The values as one flat array, float32 unless given in float64 (no precision lost)."""
    dtype = torch.float64 if depth.dtype in (torch.float64, np.float64) else torch.float32
    return as_numpy(depth, dtype).ravel()


class DepthMetric(CountMetric):
    """``update(pred, target)`` with ``B x 1 x H x W`` depths in metres (target 0 = no measurement)."""

    def __init__(self) -> None:
        super().__init__()
        self.add_state("pixels", torch.zeros((), dtype=torch.int64))
        self.add_state("errors", torch.zeros(3, dtype=torch.float64))  # squared, abs-rel, abs log10
        self.add_state("within", torch.zeros(3, dtype=torch.int64))  # delta < 1.25, 1.25^2, 1.25^3

    def update(self, pred: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray) -> None:
        check_shapes(pred, target, "depth")
        # selected in the given precision, then float64 (exact from float32): the sums are those of float64 maps
        pred, target = _flat(pred), _flat(target)
        valid = (target > 0) & np.isfinite(target)
        if not valid.all():
            pred, target = pred[valid], target[valid]
        pred, target = pred.astype(np.float64), target.astype(np.float64)
        if not all_finite(pred):
            raise ValueError("depth prediction holds NaN or infinite values")
        np.maximum(pred, MIN_DEPTH, out=pred)
        ratio = np.maximum(pred / target, target / pred)
        error = pred - target
        log_error = np.log10(pred)
        log_error -= np.log10(target)
        self.add("pixels", pred.size)
        self.add(
            "errors",
            [
                np.sum(np.square(error)),
                np.sum(np.divide(np.abs(error, out=error), target, out=error)),
                np.sum(np.abs(log_error, out=log_error)),
            ],
        )
        self.add("within", [np.count_nonzero(ratio < 1.25**k) for k in (1, 2, 3)])

    def compute(self) -> dict[str, float]:
        n = int(self.counts["pixels"])
        if n == 0:
            return {key: float("nan") for key in ("rmse", "abs_rel", "log10", "delta1", "delta2", "delta3")}
        squared, abs_rel, log10 = (self.counts["errors"] / n).tolist()
        within = (100.0 * self.counts["within"].double() / n).tolist()
        return {
            "rmse": float(np.sqrt(squared)),
            "abs_rel": abs_rel,
            "log10": log10,
            "delta1": within[0],
            "delta2": within[1],
            "delta3": within[2],
        }
