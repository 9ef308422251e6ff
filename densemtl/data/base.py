"""What every dataset provides: a :class:`DatasetInfo` and samples in one dict format.

A sample is ``{"image": float 3 x H x W (normalised), <task>: target tensor, "meta": {...}}`` with the
target conventions of :mod:`densemtl.tasks`, and ``meta`` holding at least ``name`` (str) and ``size``
(the original ``(H, W)`` before any padding or crop), so predictions can be cropped back and saved.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class DatasetInfo:
    """Facts about a dataset that tasks, metrics and models need."""

    name: str
    tasks: tuple[str, ...]
    num_classes: dict[str, int] = field(default_factory=dict)  # for class-map tasks
    class_names: dict[str, list[str]] = field(default_factory=dict)
    boundary_max_dist: float = 0.011  # maxDist of the boundary protocol, fraction of the diagonal


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors; keep ``meta`` as a list of dicts."""
    batch: dict[str, Any] = {"meta": [sample["meta"] for sample in samples]}
    for key in samples[0]:
        if key != "meta":
            batch[key] = torch.stack([sample[key] for sample in samples])
    return batch
