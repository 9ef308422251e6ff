"""The ``lps`` scheme: MT-CP's loss prioritization, scheduled as its released code does, on log-projected losses."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from densemtl.errors import ConfigError
from densemtl.losses.balancers.base import WindowedBalancer

PROJECTIONS = ("log", "none")
FLOORS = ("absolute", "none")
NORMALIZATIONS = ("none", "sum")


class LPSBalancer(WindowedBalancer):
    """MT-CP loss prioritization: tasks whose loss falls slower than the total get more weight.

    Projection: with ``projection: log`` (default) each task's term is ``p_t = log(1 + b_t L_t)``, the
    paper's idea of putting the losses on a common logarithmic scale (the released code has this line
    commented out); with ``none`` it is ``b_t L_t``, as the released code runs. The total
    back-propagated is ``sum w_t p_t``. The schedule follows the released code, one window standing for
    its epoch, with ``P`` the window means of ``p`` and ``P_tot = sum P``:

    - first window: ``w_t = 1`` (the configured weights ``b_t``);
    - after it: ``w_t = P_tot / P_t``, without spread;
    - after every later window: ``w_t = (P_t^e / P_t^{e-1}) / (P_tot^e / P_tot^{e-1})``, then
      ``w <- mean(w) + spread (w - mean(w))``.

    The spread can push weights below zero (at 7.5 on ordinary loss histories), which would make
    training climb that task's loss; the released code never met this because its weights never reach
    the gradient. ``floor: absolute`` (default) raises every weight to at least ``min_weight``;
    ``floor: none`` keeps the formula's values. ``normalize: sum`` rescales the weights to sum to the
    number of tasks; by default (``none``) they are used as computed, as in the released code.
    Only the losses this balancer is given enter the statistic: the engine keeps deep supervision
    outside it (``mtcp.deep_supervision: official``), as the released code does.
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
        floor: str = "absolute",
        min_weight: float = 0.01,
        normalize: str = "none",
    ) -> None:
        super().__init__(task_names, base_weights, window)
        for key, value, allowed in (("projection", projection, PROJECTIONS), ("floor", floor, FLOORS),
                                    ("normalize", normalize, NORMALIZATIONS)):
            if value not in allowed:
                raise ConfigError(f"loss.balancer_args.{key}: expected {' or '.join(allowed)}, got {value!r}")
        if not math.isfinite(spread) or spread < 0:
            raise ConfigError(f"loss.balancer_args.spread: must be a finite number >= 0, got {spread}")
        if not math.isfinite(min_weight) or min_weight <= 0:
            raise ConfigError(f"loss.balancer_args.min_weight: must be a finite number > 0, got {min_weight}")
        self.spread = spread
        self.projection = projection
        self.floor = floor
        self.min_weight = min_weight
        self.normalize = normalize

    def _projected(self, stacked: Tensor) -> Tensor:
        scaled = self.base.to(stacked.device) * stacked
        return torch.log1p(scaled) if self.projection == "log" else scaled

    def _new_weights(self) -> Tensor:
        current = self.history[1].clamp_min(1e-12)
        if int(self.completed) == 1:
            weights = current.sum() / current
        else:
            previous = self.history[0].clamp_min(1e-12)
            weights = lps_spread((current / previous) / (current.sum() / previous.sum()), self.spread)
        if self.floor == "absolute":
            weights = weights.clamp_min(self.min_weight)
        if self.normalize == "sum":
            weights = weights * (len(weights) / weights.sum())
        return weights

    def _reported(self, weights: Tensor) -> dict[str, float]:
        return self._as_dict(weights if self.projection == "log" else weights * self.base.to(weights.device))


def lps_spread(raw: Tensor, spread: float) -> Tensor:
    """``mean + spread (raw - mean)``: the weights moved apart (spread > 1) or together (< 1) about their mean."""
    mean = raw.mean()
    return mean + spread * (raw - mean)
