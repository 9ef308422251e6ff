"""The ``dwa`` scheme: weights from how fast each loss falls (Liu, Johns and Davison, 2019)."""

from __future__ import annotations

import torch
from torch import Tensor

from densemtl.errors import ConfigError
from densemtl.losses.balancers.base import WindowedBalancer


class DWABalancer(WindowedBalancer):
    """Dynamic weight average (Liu et al., 2019): ``w = T softmax(r / temperature)``,
    ``r_t = L_t(previous window) / L_t(the window before)``; ones until two windows are done."""

    name = "dwa"

    def __init__(
        self, task_names: list[str], base_weights: dict[str, float], *, temperature: float = 2.0, window: int = 50
    ) -> None:
        super().__init__(task_names, base_weights, window)
        if temperature <= 0:
            raise ConfigError(f"loss.balancer_args.temperature: must be positive, got {temperature}")
        self.temperature = temperature

    def _new_weights(self) -> Tensor:
        if int(self.completed) < 2:
            return torch.ones_like(self.weights)
        ratio = self.history[1] / self.history[0].clamp_min(1e-12)
        return len(self.task_names) * torch.softmax(ratio / self.temperature, dim=0)
