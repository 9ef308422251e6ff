"""Semantic segmentation and human parts: one confusion matrix over the whole split.

IoU of a class = tp / (tp + fp + fn) from the split-level confusion matrix (never averaged per image),
ground-truth pixels labelled 255 ignored. mIoU is the mean over the classes that occur in the ground
truth or the prediction of the split; on the full NYUD-v2 / PASCAL-Context splits every class occurs,
so this equals the field's mean over all classes, and on small subsets it does not punish a model for
classes that are simply absent.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from densemtl.arrays import as_numpy
from densemtl.constants import IGNORE_INDEX
from densemtl.metrics.base import CountMetric, check_shapes


class ConfusionMetric(CountMetric):
    """``update(pred, target)`` with int class ids ``B x H x W`` (target 255 = ignore)."""

    def __init__(self, num_classes: int, class_names: Sequence[str] | None = None) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
        self.num_classes = num_classes
        self.class_names = list(class_names) if class_names else [str(i) for i in range(num_classes)]
        super().__init__()
        self.add_state("confusion", torch.zeros(num_classes, num_classes, dtype=torch.int64))  # target x prediction

    def update(self, pred: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray) -> None:
        check_shapes(pred, target, "semseg")
        pred = as_numpy(pred, torch.float64).astype(np.int64).ravel()
        target = as_numpy(target, torch.float64).astype(np.int64).ravel()
        valid = target != IGNORE_INDEX
        pred, target = pred[valid], target[valid]
        for name, values in (("prediction", pred), ("target", target)):
            if values.size and (values.min() < 0 or values.max() >= self.num_classes):
                bad = values[(values < 0) | (values >= self.num_classes)][0]
                raise ValueError(f"{name} label {bad} outside 0..{self.num_classes - 1} (and 255 = ignore)")
        index = target * self.num_classes + pred
        counts = np.bincount(index, minlength=self.num_classes**2).reshape(self.num_classes, self.num_classes)
        self.add("confusion", counts)

    def per_class_iou(self) -> np.ndarray:
        """IoU per class in percent; NaN for a class absent from both ground truth and prediction."""
        confusion = self.counts["confusion"].numpy().astype(np.float64)
        tp = np.diag(confusion)
        union = confusion.sum(0) + confusion.sum(1) - tp
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(union > 0, 100.0 * tp / union, np.nan)

    def compute(self) -> dict[str, float]:
        confusion = self.counts["confusion"].numpy()
        iou = self.per_class_iou()
        total = confusion.sum()
        return {
            "mIoU": float(np.nanmean(iou)) if np.isfinite(iou).any() else 0.0,
            "pixel_acc": float(100.0 * np.trace(confusion) / total) if total else 0.0,
        }

    def table(self) -> str:
        iou = self.per_class_iou()
        width = max(12, *(len(name) for name in self.class_names))
        rows = [f"{'class':<{width}} {'IoU':>8}"]
        for name, value in zip(self.class_names, iou, strict=True):
            rows.append(f"{name:<{width}} {'-' if np.isnan(value) else f'{value:8.2f}':>8}")
        summary = self.compute()
        rows.append(f"{'mIoU':<{width}} {summary['mIoU']:8.2f}")
        rows.append(f"{'pixel_acc':<{width}} {summary['pixel_acc']:8.2f}")
        return "\n".join(rows)
