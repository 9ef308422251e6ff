"""What every metric shares: the :class:`Metric` protocol and count tensors summed over batches and processes.

A metric keeps only sums (confusion matrices, sums of errors, histograms, matched-pixel counts), never
per-batch averages, so the result is the same whatever the batch split and ``sync`` is one
all-reduce (SUM) per count tensor.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Protocol, runtime_checkable

import numpy as np
import torch
import torch.distributed as dist


@runtime_checkable
class Metric(Protocol):
    """What the engine relies on from the metric of a task (:meth:`densemtl.tasks.Task.build_metric`)."""

    def update(self, pred: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray) -> None:
        """Add one batch: ``pred = Task.predict(raw)`` and the batch's target."""

    def compute(self) -> dict[str, float]:
        """The figures of everything added since the last :meth:`reset`."""

    def reset(self) -> None:
        """Forget everything accumulated so far."""

    def sync(self) -> None:
        """Combine the state of all processes (a no-op outside torch.distributed)."""

    def table(self) -> str:
        """The figures as a text table (per class where the metric has classes)."""

    def settings(self) -> dict[str, object]:
        """The evaluation choices its figures depend on (e.g. thresholds), recorded in result files."""


def check_shapes(pred: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray, name: str) -> None:
    if tuple(pred.shape) != tuple(target.shape):
        raise ValueError(f"{name}: prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")


class CountMetric(ABC):
    """A :class:`Metric` whose state is count tensors declared with :meth:`add_state` in ``__init__``.

    ``update`` adds to them with :meth:`add`; :meth:`reset` puts them back to their zeros and
    :meth:`sync` sums them over processes.
    """

    def __init__(self) -> None:
        self.counts: dict[str, torch.Tensor] = {}
        self._zeros: dict[str, torch.Tensor] = {}

    def add_state(self, name: str, zeros: torch.Tensor) -> None:
        """Declare the count tensor ``name``, which starts at (and resets to) ``zeros``; its dtype is kept."""
        self._zeros[name] = zeros
        self.counts[name] = zeros.clone()

    def reset(self) -> None:
        """Forget everything accumulated so far."""
        self.counts = {name: zeros.clone() for name, zeros in self._zeros.items()}

    def add(self, name: str, value: np.ndarray | float | int | list[float]) -> None:
        self.counts[name] += torch.as_tensor(value, dtype=self.counts[name].dtype)

    def sync(self) -> None:
        """Sum the counts over all processes (a no-op outside torch.distributed)."""
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return
        # NCCL reduces GPU tensors only; the counts live on the CPU, where the metrics run
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
        for name in sorted(self.counts):
            counts = self.counts[name]
            reduced = counts.to(device) if device is not None else counts
            dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
            counts.copy_(reduced)

    def settings(self) -> dict[str, object]:
        """The choices its figures depend on beyond the data (thresholds, matcher...): result files record
        them so that figures computed differently are never compared."""
        return {}

    @abstractmethod
    def update(self, pred: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray) -> None:
        """Add one batch's counts."""

    @abstractmethod
    def compute(self) -> dict[str, float]:
        """The figures of the counts."""

    def table(self) -> str:
        """A text table of the figures (subclasses with per-class figures override it)."""
        rows = [f"{name:<12} {value:10.4f}" for name, value in self.compute().items()]
        return "\n".join([f"{'metric':<12} {'value':>10}", *rows])
