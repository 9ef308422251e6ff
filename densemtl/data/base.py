"""What every dataset provides: samples in one dict format (and a :class:`DatasetInfo` as ``info``).

A sample is ``{"image": float 3 x H x W (normalised), <task>: target tensor, "meta": {...}}`` with the
target conventions of :mod:`densemtl.tasks`, and ``meta`` holding at least ``name`` (str) and ``size``
(the original ``(H, W)`` before any padding or crop), so predictions can be cropped back and saved.
"""

from __future__ import annotations

from typing import Any

import torch


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors; keep ``meta`` as a list of dicts."""
    batch: dict[str, Any] = {"meta": [sample["meta"] for sample in samples]}
    for key in samples[0]:
        if key != "meta":
            batch[key] = torch.stack([sample[key] for sample in samples])
    return batch
