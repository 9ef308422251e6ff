"""Saliency: maxF (beta^2 = 0.3) on split-level counts, and Multi-Task-Learning-PyTorch's mIoU.

``maxF`` (the field's tables; ATRC / InvPT): for each threshold t of ``linspace(0.05, 0.95, thresholds)``
a pixel is predicted salient when p >= t; true positives, predicted positives and actual positives are
summed over the split, giving one precision/recall pair per threshold, F = (1 + b2) P R / (b2 P + R),
and maxF = the best threshold's F. The probabilities are taken as given (the task's ``predict`` already
applied the sigmoid once).

``mIoU`` (Multi-Task-Learning-PyTorch, ``evaluation/eval_sal.py`` and ``evaluation/jaccard.py``): for each
of the 15 thresholds ``linspace(0.2, 0.9, 15)`` a pixel is salient when p > t, compared in single precision
as its meter does (float32 maps against the float32 threshold); the IoU with the ground truth is taken per
image (1 when both are empty) and averaged over images; mIoU = the best threshold's mean.

Pixels labelled 255 are ignored by both (the reference mIoU has no ignore label; the released saliency
maps hold none, only padding does). Both in percent.
"""

from __future__ import annotations

import numpy as np
import torch

from densemtl.arrays import as_numpy
from densemtl.constants import IGNORE_INDEX
from densemtl.metrics.base import CountMetric, check_shapes

BETA2 = 0.3
IOU_THRESHOLDS = np.linspace(0.2, 0.9, 15).astype(np.float32)


def _count_above(sorted_values: np.ndarray, thresholds: np.ndarray, strict: bool) -> np.ndarray:
    """How many of ``sorted_values`` are > (``strict``) or >= each threshold."""
    return sorted_values.size - np.searchsorted(sorted_values, thresholds, side="right" if strict else "left")


class SaliencyMetric(CountMetric):
    """``update(pred, target)`` with ``B x 1 x H x W`` probabilities and {0, 1, 255} targets."""

    def __init__(self, thresholds: int = 19) -> None:
        if thresholds < 1:
            raise ValueError(f"saliency thresholds must be positive, got {thresholds}")
        self.thresholds = np.round(np.linspace(0.05, 0.95, thresholds), 12)  # 0.6 is the double nearest 0.6
        super().__init__()
        self.add_state("tp", torch.zeros(thresholds, dtype=torch.int64))
        self.add_state("predicted", torch.zeros(thresholds, dtype=torch.int64))
        self.add_state("actual", torch.zeros((), dtype=torch.int64))
        self.add_state("iou", torch.zeros(len(IOU_THRESHOLDS), dtype=torch.float64))  # per-image IoU, summed
        self.add_state("images", torch.zeros((), dtype=torch.int64))

    def settings(self) -> dict[str, object]:
        return {"thresholds": len(self.thresholds)}

    def update(self, pred: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray) -> None:
        check_shapes(pred, target, "saliency")
        pred = as_numpy(pred, torch.float64).reshape(pred.shape[0], -1)
        target = as_numpy(target, torch.float64).reshape(target.shape[0], -1)
        for p, t in zip(pred, target, strict=True):
            valid = t != IGNORE_INDEX
            p, positive = p[valid], t[valid] > 0.5
            # counts at every threshold from one sort
            order = np.sort(p)
            positives_sorted = np.sort(p[positive])
            self.add("tp", _count_above(positives_sorted, self.thresholds, strict=False))
            self.add("predicted", _count_above(order, self.thresholds, strict=False))
            self.add("actual", int(positive.sum()))
            single, single_positives = order.astype(np.float32), positives_sorted.astype(np.float32)
            hits = _count_above(single, IOU_THRESHOLDS, strict=True)
            intersection = _count_above(single_positives, IOU_THRESHOLDS, strict=True)
            union = positives_sorted.size + hits - intersection
            iou = np.divide(intersection, union, out=np.ones(len(IOU_THRESHOLDS)), where=union > 0)
            self.add("iou", iou)
            self.add("images", 1)

    def compute(self) -> dict[str, float]:
        tp = self.counts["tp"].double().numpy()
        predicted = self.counts["predicted"].double().numpy()
        actual = float(self.counts["actual"])
        precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
        recall = tp / actual if actual > 0 else np.zeros_like(tp)
        denominator = BETA2 * precision + recall
        f = np.divide((1 + BETA2) * precision * recall, denominator, out=np.zeros_like(tp), where=denominator > 0)
        images = int(self.counts["images"])
        miou = float(100.0 * self.counts["iou"].max() / images) if images else float("nan")
        return {"maxF": float(100.0 * f.max()), "mIoU": miou}
