"""The ``uncertainty`` scheme: one learnable log-variance per task (Kendall, Gal and Cipolla, 2018)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from densemtl.losses.balancers.base import Balancer


class UncertaintyBalancer(Balancer):
    """Kendall et al. (2018): learnable log-variances ``s_t``; ``sum exp(-s_t) b_t L_t + s_t``.

    This is the homoscedastic-uncertainty objective up to a factor 2 (``1/(2 sigma^2) L + log sigma``
    with ``s = log sigma^2``), chosen so the weights start at exactly the base weights.
    """

    name = "uncertainty"

    def __init__(self, task_names: list[str], base_weights: dict[str, float], *, init_log_var: float = 0.0) -> None:
        super().__init__(task_names, base_weights)
        self.log_vars = nn.Parameter(torch.full((len(self.task_names),), float(init_log_var)))

    def combine(
        self, losses: dict[str, Tensor], step: int, shared_parameters: list[nn.Parameter] | None = None
    ) -> tuple[Tensor, dict[str, float]]:
        stacked = self._stack(losses)
        log_vars = self.log_vars.to(stacked.device)
        factor = torch.exp(-log_vars) * self.base.to(stacked.device)
        total = (factor * stacked).sum() + (log_vars * self._present(losses, stacked.device)).sum()
        return total, self._as_dict(factor)
