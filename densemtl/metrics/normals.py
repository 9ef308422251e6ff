"""Surface normals: angular error in degrees between the L2-normalised prediction and ground truth.

Valid pixels are those whose ground truth is not the zero vector. Mean, RMSE and the percentages within
11.25 / 22.5 / 30 degrees come from exact sums and counts. The median comes from a histogram of the
angles with 0.01-degree bins (18000 int64 counts, summed across processes like every other count): the
value reported is the centre of the bin holding the median (averaged with the next one for an even
count), so it is within 0.005 degree of the exact median of all angles of the split.
"""

from __future__ import annotations

import numpy as np
import torch

from densemtl.arrays import as_numpy
from densemtl.metrics.base import CountMetric, check_shapes

BIN_DEG = 0.01
NUM_BINS = int(round(180.0 / BIN_DEG))
THRESHOLDS_DEG = {"11.25": 11.25, "22.5": 22.5, "30": 30.0}


def _dots(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-pixel dot products of ``3 x N`` vectors (``einsum`` sums in an order that depends on the memory
    layout, which is part of the figures' last bits: callers pass contiguous ``3 x N`` arrays)."""
    return np.einsum("cn,cn->n", a, b)


def angles_deg(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Angles (degrees) between ``3 x N`` prediction and ground-truth vectors, both normalised."""
    pred_norm = np.maximum(np.sqrt(_dots(pred, pred)), 1e-12)
    cosine = _dots(pred, target)
    cosine /= pred_norm * np.sqrt(_dots(target, target))
    np.clip(cosine, -1.0, 1.0, out=cosine)
    return np.degrees(np.arccos(cosine, out=cosine), out=cosine)


def _vectors(normals: torch.Tensor | np.ndarray) -> np.ndarray:
    """``B x 3 x H x W`` as ``3 x N`` (a view for one image), in float32 unless given in float64."""
    dtype = torch.float64 if normals.dtype in (torch.float64, np.float64) else torch.float32
    return np.moveaxis(as_numpy(normals, dtype), 1, 0).reshape(3, -1)


def _valid_vectors(normals: np.ndarray, valid: np.ndarray | None) -> np.ndarray:
    """The float64 ``3 x len(valid)`` vectors (contiguous) at the flat indices ``valid`` (None: all) of a
    ``3 x N`` map. Taken in the map's own precision first: float32 -> float64 is exact."""
    return (normals if valid is None else normals[:, valid]).astype(np.float64)


class NormalsMetric(CountMetric):
    """``update(pred, target)`` with ``B x 3 x H x W`` normals (target zero vector = invalid)."""

    def __init__(self) -> None:
        super().__init__()
        self.add_state("sums", torch.zeros(2, dtype=torch.float64))  # angle, angle^2
        self.add_state("within", torch.zeros(len(THRESHOLDS_DEG), dtype=torch.int64))
        self.add_state("histogram", torch.zeros(NUM_BINS, dtype=torch.int64))

    def update(self, pred: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray) -> None:
        check_shapes(pred, target, "normals")
        if pred.ndim != 4 or pred.shape[1] != 3:
            raise ValueError(f"normals: expected B x 3 x H x W, got {tuple(pred.shape)}")
        pred, target = _vectors(pred), _vectors(target)
        valid = (target[0] != 0) | (target[1] != 0) | (target[2] != 0)
        valid = None if valid.all() else np.flatnonzero(valid)
        angles = angles_deg(_valid_vectors(pred, valid), _valid_vectors(target, valid))
        self.add("sums", [angles.sum(), np.square(angles).sum()])
        self.add("within", [np.count_nonzero(angles < t) for t in THRESHOLDS_DEG.values()])
        bins = np.minimum((angles / BIN_DEG).astype(np.int64), NUM_BINS - 1)
        self.add("histogram", np.bincount(bins, minlength=NUM_BINS))

    def median(self) -> float:
        histogram = self.counts["histogram"].numpy()
        n = int(histogram.sum())
        cumulative = np.cumsum(histogram)
        lower = int(np.searchsorted(cumulative, (n - 1) // 2 + 1))  # bin of the (n-1)//2-th angle
        upper = int(np.searchsorted(cumulative, n // 2 + 1))  # bin of the n//2-th angle
        return float((lower + upper + 1) * BIN_DEG / 2)

    def compute(self) -> dict[str, float]:
        n = int(self.counts["histogram"].sum())
        if n == 0:
            return {key: float("nan") for key in ("mean", "median", "rmse", *THRESHOLDS_DEG)}
        total, squares = self.counts["sums"].tolist()
        within = (100.0 * self.counts["within"].double() / n).tolist()
        return {
            "mean": total / n,
            "median": self.median(),
            "rmse": float(np.sqrt(squares / n)),
            **dict(zip(THRESHOLDS_DEG, within, strict=True)),
        }
