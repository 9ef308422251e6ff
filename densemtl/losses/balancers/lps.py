"""The ``lps`` scheme: MT-CP's loss prioritization, optionally on log-projected losses."""

from __future__ import annotations

import torch
from torch import Tensor

from densemtl.errors import ConfigError
from densemtl.losses.balancers.base import WindowedBalancer


class LPSBalancer(WindowedBalancer):
    """MT-CP loss prioritization: tasks whose loss falls slower than the total get more weight.

    Losses are first projected to a common scale: with ``projection: log`` each task's term is
    ``p_t = log(1 + b_t L_t)`` (positive, compresses the spread of loss magnitudes; its gradient is
    ``b_t grad L_t / (1 + b_t L_t)``), with ``none`` it is ``b_t L_t``. The total back-propagated is
    ``sum w_t p_t``. Per window, with ``P`` the window means of ``p`` and ``P_tot = sum P``:
    first window ``w_t = P_tot / P_t``; afterwards ``w_t = (P_t^e / P_t^{e-1}) / (P_tot^e / P_tot^{e-1})``.
    Then ``w <- mean(w) + spread (w - mean(w))``, clipped to at least ``min_weight * mean(w)`` and
    normalised to sum to the number of tasks. Weights are 1 during the first window; ``spread: 0`` keeps
    them at 1 throughout (the log projection alone, an ablation of the prioritization).
    """

    name = "lps"

    def __init__(
        self,
        task_names: list[str],
        base_weights: dict[str, float],
        *,
        spread: float = 1.6,
        window: int = 50,
        projection: str = "log",
        min_weight: float = 0.05,
    ) -> None:
        super().__init__(task_names, base_weights, window)
        if projection not in ("log", "none"):
            raise ConfigError(f"loss.balancer_args.projection: expected log or none, got {projection!r}")
        if spread < 0 or not 0 < min_weight < 1:
            raise ConfigError(
                f"loss.balancer_args: spread must be >= 0 and min_weight in (0, 1), got {spread}, {min_weight}"
            )
        self.spread = spread
        self.projection = projection
        self.min_weight = min_weight

    def _projected(self, stacked: Tensor) -> Tensor:
        scaled = self.base.to(stacked.device) * stacked
        return torch.log1p(scaled) if self.projection == "log" else scaled

    def _new_weights(self) -> Tensor:
        current = self.history[1].clamp_min(1e-12)
        if int(self.completed) == 1:
            raw = current.sum() / current
        else:
            previous = self.history[0].clamp_min(1e-12)
            raw = (current / previous) / (current.sum() / previous.sum())
        return lps_spread(raw, self.spread, self.min_weight)

    def _reported(self, weights: Tensor) -> dict[str, float]:
        return self._as_dict(weights if self.projection == "log" else weights * self.base.to(weights.device))


def lps_spread(raw: Tensor, spread: float, min_weight: float) -> Tensor:
    """Spread weights around their mean by ``spread``, keep them positive, make them sum to their count."""
    mean = raw.mean()
    spread_out = (mean + spread * (raw - mean)).clamp_min(min_weight * mean)
    return spread_out * (len(raw) / spread_out.sum())
