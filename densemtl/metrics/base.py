"""What every metric shares: named count tensors that are summed over batches and over processes.

A metric keeps only sums (confusion matrices, sums of errors, histograms, matched-pixel counts), never
per-batch averages, so the result is the same whatever the batch split and ``sync`` is one
all-reduce (SUM) per count tensor.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist


def as_numpy(value: torch.Tensor | np.ndarray) -> np.ndarray:
    """A CPU numpy view/copy of a tensor (floats as float64 for exact sums)."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        return value.double().numpy() if value.is_floating_point() else value.numpy()
    return np.asarray(value)


def check_shapes(pred: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray, name: str) -> None:
    if tuple(pred.shape) != tuple(target.shape):
        raise ValueError(f"{name}: prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")


class CountMetric:
    """Base class: subclasses define :meth:`zero_counts` and fill ``self.counts`` in ``update``."""

    def __init__(self) -> None:
        self.counts: dict[str, torch.Tensor] = {}
        self.reset()

    def zero_counts(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def reset(self) -> None:
        """Forget everything accumulated so far."""
        self.counts = self.zero_counts()

    def add(self, name: str, value: np.ndarray | float | int) -> None:
        self.counts[name] += torch.as_tensor(value, dtype=self.counts[name].dtype)

    def sync(self) -> None:
        """Sum the counts over all processes (a no-op outside torch.distributed)."""
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return
        for name in sorted(self.counts):
            dist.all_reduce(self.counts[name], op=dist.ReduceOp.SUM)

    def compute(self) -> dict[str, float]:
        raise NotImplementedError

    def table(self) -> str:
        """A text table of the figures (subclasses with per-class figures override it)."""
        rows = [f"{name:<12} {value:10.4f}" for name, value in self.compute().items()]
        return "\n".join([f"{'metric':<12} {'value':>10}", *rows])
