"""How a task's labels relate two pixels: the rule the contrastive regularizer learns from.

A :class:`LabelRelation` says which pixels of a target may be sampled (valid), which class each belongs
to for class-balanced sampling (if the labels have classes), and which pairs of sampled pixels are
positives (should embed close) or negatives (far apart). Each task picks its relation with
:meth:`densemtl.tasks.Task.label_relation`, so the regularizer has no task branches and a new kind of
label brings its own relation class.

The relations of the built-in tasks:

- **classes** (semseg, human_parts; edge and saliency binarised at 0.5): same class = positive,
  otherwise negative; 255 is invalid;
- **depth**: relative difference ``|a - b| / min(a, b)`` under ``positive`` = positive, over
  ``negative`` = negative, between = ignored; 0 is invalid;
- **normals**: angle under ``positive_deg`` = positive, over ``negative_deg`` = negative, between =
  ignored; the zero vector is invalid.

Padding carries these invalid values, so it is never sampled. A pixel is never its own positive.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from densemtl.constants import IGNORE_INDEX

Sample = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # batch index, row, column (each N long)


class LabelRelation:
    """How one task's ground truth marks pixels valid, balances samples and relates pixel pairs."""

    def valid(self, target: torch.Tensor) -> torch.Tensor:
        """B x H x W bool: pixels that may be sampled."""
        raise NotImplementedError

    def classes(self, target: torch.Tensor) -> torch.Tensor | None:
        """B x H x W long class ids for class-balanced sampling, or None to sample uniformly."""
        return None

    def values(self, target: torch.Tensor, sample: Sample) -> torch.Tensor:
        """N x K label values at the sampled pixels."""
        b, y, x = sample
        if target.dim() == 3:
            return target[b, y, x][:, None]
        return target[b, :, y, x]

    def relate(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """N x N bool (positive, negative) masks; the diagonal is in neither."""
        raise NotImplementedError


class ClassRelation(LabelRelation):
    """Class maps (ignore 255) and binary probability maps (255 = ignore, binarised at 0.5)."""

    def __init__(self, binary: bool) -> None:
        self.binary = binary

    def valid(self, target: torch.Tensor) -> torch.Tensor:
        return _spatial(torch.isfinite(target) & (target != IGNORE_INDEX))

    def classes(self, target: torch.Tensor) -> torch.Tensor:
        labels = (target >= 0.5).long() if self.binary else target.long()
        return _spatial(torch.where(self.valid(target).view_as(labels), labels, IGNORE_INDEX))

    def values(self, target: torch.Tensor, sample: Sample) -> torch.Tensor:
        return self.classes(target)[sample][:, None]

    def relate(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        same = values[:, 0][:, None] == values[:, 0][None, :]
        return _off_diagonal(same), ~same


class DepthRelation(LabelRelation):
    """Depth in metres (0 = invalid): close by relative difference = positive, far = negative."""

    def __init__(self, positive: float, negative: float) -> None:
        self.positive = positive
        self.negative = negative

    def valid(self, target: torch.Tensor) -> torch.Tensor:
        return _spatial(torch.isfinite(target) & (target > 0))

    def relate(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        depth = values[:, 0].float()
        relative = (depth[:, None] - depth[None, :]).abs() / torch.minimum(depth[:, None], depth[None, :])
        return _off_diagonal(relative < self.positive), relative > self.negative


class NormalsRelation(LabelRelation):
    """Unit normals (zero vector = invalid): small angle = positive, large angle = negative."""

    def __init__(self, positive_deg: float, negative_deg: float) -> None:
        self.cos_positive = math.cos(math.radians(positive_deg))
        self.cos_negative = math.cos(math.radians(negative_deg))

    def valid(self, target: torch.Tensor) -> torch.Tensor:
        return torch.isfinite(target).all(dim=1) & (target.abs().sum(dim=1) > 0)

    def relate(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        unit = F.normalize(values.float(), dim=1)
        cosine = unit @ unit.T
        return _off_diagonal(cosine > self.cos_positive), cosine < self.cos_negative


def _spatial(mask: torch.Tensor) -> torch.Tensor:
    """B x 1 x H x W or B x H x W -> B x H x W."""
    return mask[:, 0] if mask.dim() == 4 else mask


def _off_diagonal(mask: torch.Tensor) -> torch.Tensor:
    return mask & ~torch.eye(mask.shape[0], dtype=torch.bool, device=mask.device)
