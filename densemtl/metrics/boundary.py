"""Boundary detection: ODS F, OIS F and AP as SEISM (the BSDS benchmark code) computes them.

Per image:

1. the soft prediction becomes the map SEISM thresholds, as the chosen protocol does it
   (:mod:`densemtl.metrics.edge_protocols`: ``seism-hed`` by default, ``invpt``, ``mtlpt``);
2. for each of the protocol's thresholds t (or, with ``thresholds=K``, t = k / (K + 1), k = 1..K) the
   pixels that count (``>= t``, or ``> t`` for ``invpt``) are thinned (``bwmorph(..., 'thin', Inf)``);
3. they are matched one-to-one to the ground-truth boundary pixels within ``max_dist x image diagonal``
   (0.011 NYUD-v2, 0.0075 PASCAL-Context) with the ``exact`` maximum matching or the ``bsds``
   assignment (:mod:`densemtl.metrics.boundary_match`). The ground truth is taken as given: the
   datasets' evaluation targets are already SEISM's ``thin(seg2bmap(G))``;
4. counts per threshold: matched ground truth (cntR), ground truth (sumR), matched prediction
   (cntP), prediction (sumP).

Pixels whose target is 255 (ignore / padding) are excluded from both sides: they are never
ground-truth boundary pixels and predicted pixels there are dropped before thresholding.

ODS = the best threshold's F of the split-level counts; OIS = F of the counts summed over images,
each image at its own best threshold (SEISM's ``general_ois``; an image without ground-truth
boundaries has F = 0 everywhere and contributes its lowest-threshold prediction count, as in SEISM);
AP = the mean of the precision
interpolated at recall 0, 0.01, .., 1 within the recall range reached (SEISM's ``general_ap``).
All in percent. What ``sync`` sums: the per-threshold counts and the OIS counts (integers).
"""

from __future__ import annotations

import numpy as np
import torch

from densemtl.arrays import as_numpy
from densemtl.constants import IGNORE_INDEX
from densemtl.metrics.base import CountMetric, check_shapes
from densemtl.metrics.boundary_match import MATCHERS, bsds_counts, bsds_kernel, exact_counts
from densemtl.metrics.edge_nms import thinned_levels
from densemtl.metrics.edge_protocols import EdgeProtocol, edge_protocol


def threshold_levels(count: int) -> np.ndarray:
    """Evenly spaced thresholds ``k / (count + 1)``, k = 1..count (0.01..0.99 for 99).

    Computed as a division so that 0.2 is the double nearest to 0.2, which is also what an 8-bit
    value 51/255 becomes: ties between a quantised map and a threshold resolve as in SEISM.
    """
    return np.arange(1, count + 1) / (count + 1)


def precision_recall(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(precision, recall, F) from ``[..., 4]`` counts (cntR, sumR, cntP, sumP), with SEISM's conventions.

    No ground truth: recall 1, precision 0; no prediction: recall 0, precision 1 (F = 0 either way).
    """
    counts = np.asarray(counts, dtype=np.float64)
    cnt_r, sum_r, cnt_p, sum_p = np.moveaxis(counts, -1, 0)
    no_gt = sum_r == 0
    no_pred = (sum_p == 0) & ~no_gt
    recall = np.where(no_gt, 1.0, np.where(no_pred, 0.0, cnt_r / np.maximum(sum_r, 1)))
    precision = np.where(no_gt, 0.0, np.where(no_pred, 1.0, cnt_p / np.maximum(sum_p, 1)))
    total = precision + recall
    f = np.divide(2 * precision * recall, total, out=np.zeros_like(total), where=total > 0)
    return precision, recall, f


def average_precision(precision: np.ndarray, recall: np.ndarray) -> float:
    """Precision interpolated at recall 0, 0.01, .., 1 inside the reached range, summed / 100."""
    unique_recall, first = np.unique(recall, return_index=True)
    if unique_recall.size < 2:
        return 0.0
    grid = np.arange(101) / 100.0
    inside = (grid >= unique_recall[0]) & (grid <= unique_recall[-1])
    return float(np.interp(grid[inside], unique_recall, precision[first]).sum() / 100.0)


def image_counts(
    prob: np.ndarray,
    target: np.ndarray,
    max_dist: float,
    thresholds: np.ndarray,
    matcher: str = "exact",
    protocol: EdgeProtocol | str = "seism-hed",
) -> np.ndarray:
    """``K x 4`` counts (cntR, sumR, cntP, sumP) of one H x W probability map against its target."""
    if isinstance(protocol, str):
        protocol = edge_protocol(protocol)
    valid = target != IGNORE_INDEX
    gt = valid & (target > 0.5)
    values = protocol.values(prob)
    values[~valid] = 0
    levels = thinned_levels(values, thresholds, strict=protocol.strict)
    counts = np.zeros((len(thresholds), 4), dtype=np.int64)
    counts[:, 1] = np.count_nonzero(gt)
    counts[:, 3] = [level.size for level in levels]
    if matcher == "exact":
        radius = max_dist * float(np.hypot(*gt.shape))
        matched = exact_counts(levels, gt, radius)
        counts[:, 0] = matched
        counts[:, 2] = matched
    else:
        counts[:, 2], counts[:, 0] = bsds_counts(levels, gt, max_dist)
    return counts


class BoundaryMetric(CountMetric):
    """``update(pred, target)`` with ``B x 1 x H x W`` probabilities and {0, 1, 255} targets.

    ``thresholds`` None takes the protocol's own; a count K takes k / (K + 1), k = 1..K (fewer thresholds
    make validation during training cheaper).
    """

    def __init__(
        self, max_dist: float, thresholds: int | None = None, matcher: str = "exact", protocol: str = "seism-hed"
    ) -> None:
        if not 0 < max_dist < 1:
            raise ValueError(f"boundary max_dist is a fraction of the diagonal in (0, 1), got {max_dist}")
        if thresholds is not None and thresholds < 1:
            raise ValueError(f"boundary thresholds must be positive, got {thresholds}")
        if matcher not in MATCHERS:
            raise ValueError(f"unknown boundary matcher '{matcher}' (known: {', '.join(MATCHERS)})")
        if matcher == "bsds":
            bsds_kernel()  # fail now, with the install hint, rather than after a model has run
        self.max_dist = max_dist
        self.matcher = matcher
        self.protocol = edge_protocol(protocol)
        self.thresholds = (
            np.array(self.protocol.thresholds) if thresholds is None else threshold_levels(thresholds)
        )
        super().__init__()
        counts = torch.zeros(len(self.thresholds), 4, dtype=torch.int64)
        self.add_state("per_threshold", counts)  # cntR, sumR, cntP, sumP per threshold
        self.add_state("ois", torch.zeros(4, dtype=torch.int64))  # each image's counts at its best threshold

    def settings(self) -> dict[str, object]:
        return {"edge_protocol": self.protocol.name, "thresholds": len(self.thresholds), "matcher": self.matcher,
                "max_dist": self.max_dist}

    def update(self, pred: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray) -> None:
        check_shapes(pred, target, "edge")
        pred = as_numpy(pred, torch.float64).reshape(-1, *pred.shape[-2:])
        target = as_numpy(target, torch.float64).reshape(-1, *target.shape[-2:])
        for prob, gt in zip(pred, target, strict=True):
            counts = image_counts(prob, gt, self.max_dist, self.thresholds, self.matcher, self.protocol)
            self.add("per_threshold", counts)
            best = int(np.argmax(precision_recall(counts)[2]))
            self.add("ois", counts[best])

    def curves(self) -> dict[str, np.ndarray]:
        """Precision, recall and F per threshold of the split-level counts."""
        precision, recall, f = precision_recall(self.counts["per_threshold"].numpy())
        return {"threshold": self.thresholds, "precision": precision, "recall": recall, "f": f}

    def compute(self) -> dict[str, float]:
        curves = self.curves()
        ois = precision_recall(self.counts["ois"].numpy())[2]
        return {
            "odsF": float(100.0 * curves["f"].max()),
            "oisF": float(100.0 * ois),
            "AP": 100.0 * average_precision(curves["precision"], curves["recall"]),
        }
