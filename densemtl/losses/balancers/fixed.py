"""The ``fixed`` scheme: the base weights, unchanged for the whole run."""

from __future__ import annotations

from torch import Tensor, nn

from densemtl.losses.balancers.base import Balancer


class FixedBalancer(Balancer):
    """Constant weights: ``loss.weights`` or each task's default."""

    name = "fixed"

    def combine(
        self, losses: dict[str, Tensor], step: int, shared_parameters: list[nn.Parameter] | None = None
    ) -> tuple[Tensor, dict[str, float]]:
        stacked = self._stack(losses)
        base = self.base.to(stacked.device)
        return (base * stacked).sum(), self._as_dict(base)
