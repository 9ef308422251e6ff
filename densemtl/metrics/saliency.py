"""Saliency: maxF (beta^2 = 0.3) on split-level counts, and the mean per-image IoU at 0.5.

For each threshold t of ``linspace(0.05, 0.95, thresholds)`` a pixel is predicted salient when
p >= t; true positives, predicted positives and actual positives are summed over the split, giving one
precision/recall pair per threshold, F = (1 + b2) P R / (b2 P + R), and maxF = the best threshold's F.
The probabilities are taken as given (the task's ``predict`` already applied the sigmoid once).
mIoU is the IoU of (p >= 0.5) with the ground truth per image, averaged over images (an image with
nothing salient in either counts as 1). Pixels labelled 255 are ignored. Both in percent.
"""

from __future__ import annotations

import numpy as np
import torch

from densemtl.arrays import as_numpy
from densemtl.constants import IGNORE_INDEX
from densemtl.metrics.base import CountMetric, check_shapes

BETA2 = 0.3


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
        self.add_state("iou", torch.zeros(2, dtype=torch.float64))  # sum of per-image IoU, number of images

    def update(self, pred: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray) -> None:
        check_shapes(pred, target, "saliency")
        pred = as_numpy(pred, torch.float64).reshape(pred.shape[0], -1)
        target = as_numpy(target, torch.float64).reshape(target.shape[0], -1)
        for p, t in zip(pred, target, strict=True):
            valid = t != IGNORE_INDEX
            p, positive = p[valid], t[valid] > 0.5
            # counts at every threshold from one sort: #(p >= thr) = n - #(p < thr)
            order = np.sort(p)
            positives_sorted = np.sort(p[positive])
            predicted = p.size - np.searchsorted(order, self.thresholds, side="left")
            tp = positives_sorted.size - np.searchsorted(positives_sorted, self.thresholds, side="left")
            self.add("tp", tp)
            self.add("predicted", predicted)
            self.add("actual", int(positive.sum()))
            hit = p >= 0.5
            union = np.count_nonzero(hit | positive)
            iou = np.count_nonzero(hit & positive) / union if union else 1.0
            self.add("iou", [iou, 1.0])

    def compute(self) -> dict[str, float]:
        tp = self.counts["tp"].double().numpy()
        predicted = self.counts["predicted"].double().numpy()
        actual = float(self.counts["actual"])
        precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
        recall = tp / actual if actual > 0 else np.zeros_like(tp)
        denominator = BETA2 * precision + recall
        f = np.divide((1 + BETA2) * precision * recall, denominator, out=np.zeros_like(tp), where=denominator > 0)
        iou_sum, images = self.counts["iou"].tolist()
        return {"maxF": float(100.0 * f.max()), "mIoU": 100.0 * iou_sum / images if images else float("nan")}
