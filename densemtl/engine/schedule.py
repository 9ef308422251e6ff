"""Learning-rate schedules: poly, cosine or constant after a linear warm-up.

The schedule is a ``LambdaLR`` so its state (the step counter) goes into checkpoints with
``state_dict`` and resumes exactly.
"""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from densemtl.config import TrainConfig


def lr_factor(step: int, total: int, warmup: int, kind: str, power: float = 0.9) -> float:
    """Multiplier of the base learning rate at optimiser step ``step`` (0-based) of ``total``.

    Warm-up rises linearly from ``1/(warmup+1)`` to 1 over ``warmup`` steps; the decay then runs over
    the remaining steps, so the schedule reaches 0 (poly, cosine) at ``total``.
    """
    if warmup > 0 and step < warmup:
        return (step + 1) / (warmup + 1)
    if kind == "constant":
        return 1.0
    span = max(total - warmup, 1)
    progress = min(max(step - warmup, 0) / span, 1.0)
    if kind == "poly":
        return (1.0 - progress) ** power
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule '{kind}' (known: poly, cosine, constant)")


def build_scheduler(optimizer: torch.optim.Optimizer, train: TrainConfig, total_steps: int | None = None) -> LambdaLR:
    """The schedule of ``train.schedule`` over ``total_steps`` (default ``train.steps``)."""
    total = train.steps if total_steps is None else total_steps
    warmup = min(train.warmup_steps, max(total - 1, 0))
    return LambdaLR(optimizer, lambda step: lr_factor(step, total, warmup, train.schedule, train.poly_power))
