"""The ``cagrad`` scheme: conflict-averse gradient descent (Liu et al., 2021)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from densemtl.errors import ConfigError
from densemtl.losses.balancers.gradient import GradientBalancer


class CAGradBalancer(GradientBalancer):
    """CAGrad, "Conflict-Averse Gradient Descent for Multi-task Learning" (Liu et al., NeurIPS 2021).

    The update ``d = g_0 + (c |g_0| / |g_w|) g_w`` maximises the worst task's improvement within a ball of
    radius ``c |g_0|`` around the average gradient ``g_0 = mean_t g_t``; ``g_w = sum w_t g_t`` with ``w`` on
    the simplex minimising ``g_w . g_0 + c |g_0| |g_w|`` (the dual, solved here by projected gradient on the
    T-dimensional simplex). ``rescale`` 1 divides ``d`` by ``1 + c^2`` (2: by ``1 + c``, 0: none), as the
    authors' code does by default. Defaults: ``c = 0.4``, the value of the authors' NYUv2 and Cityscapes
    dense-prediction runs, and ``rescale = 1``.
    """

    name = "cagrad"

    def __init__(
        self, task_names: list[str], base_weights: dict[str, float], *, gradients: str = "parameters", c: float = 0.4,
        rescale: int = 1,
    ) -> None:
        super().__init__(task_names, base_weights, gradients)
        if not 0 <= c < float("inf"):
            raise ConfigError(f"loss.balancer_args.c: must be a finite number >= 0, got {c}")
        if rescale not in (0, 1, 2):
            raise ConfigError(f"loss.balancer_args.rescale: expected 0, 1 or 2, got {rescale}")
        self.c = c
        self.rescale = rescale

    def _coefficients(self, gram: np.ndarray, losses: np.ndarray, step: int, tasks: torch.Tensor) -> np.ndarray:
        count = len(gram)
        scale = gram.mean()  # |g_0|^2
        if scale <= 0:  # the gradients cancel: g_0 = 0 and no direction improves every task
            return np.full(count, 1.0 / count)
        normed = gram / scale  # the problem is invariant to the scale; |g_0| becomes 1
        towards_mean = normed.mean(axis=1)  # (K w . g_0) per unit w

        def objective(w: np.ndarray) -> tuple[float, np.ndarray]:
            spread = max(float(w @ normed @ w), 1e-16)
            root = np.sqrt(spread)
            return float(w @ towards_mean) + self.c * root, towards_mean + self.c * (normed @ w) / root

        w = minimize_on_simplex(objective, count)
        reach = self.c / np.sqrt(max(float(w @ normed @ w), 1e-16))  # c |g_0| / |g_w|
        coefficients = np.full(count, 1.0 / count) + reach * w
        return coefficients / {0: 1.0, 1: 1 + self.c**2, 2: 1 + self.c}[self.rescale]


def project_to_simplex(point: np.ndarray) -> np.ndarray:
    """The Euclidean projection of ``point`` onto ``{w >= 0, sum w = 1}`` (sort-based, exact)."""
    ordered = np.sort(point)[::-1]
    cumulative = np.cumsum(ordered) - 1.0
    ranks = np.arange(1, len(point) + 1)
    last = np.nonzero(ordered - cumulative / ranks > 0)[0][-1]
    return np.maximum(point - cumulative[last] / (last + 1), 0.0)


ValueAndGradient = Callable[[np.ndarray], tuple[float, np.ndarray]]


def minimize_on_simplex(
    objective: ValueAndGradient, size: int, iterations: int = 2000, tolerance: float = 1e-12
) -> np.ndarray:
    """Minimise a convex function over the probability simplex: accelerated projected gradient (FISTA)
    with backtracking and a restart whenever the objective rises; ``objective(w) -> (value, gradient)``."""
    current = np.full(size, 1.0 / size)
    value, _ = objective(current)
    search, momentum, step = current.copy(), 1.0, 1.0
    for _ in range(iterations):
        search_value, gradient = objective(search)
        while True:
            candidate = project_to_simplex(search - step * gradient)
            move = candidate - search
            candidate_value, _ = objective(candidate)
            if candidate_value <= search_value + gradient @ move + move @ move / (2 * step) + 1e-15 or step < 1e-20:
                break
            step *= 0.5
        if candidate_value > value:  # restart the momentum from the best point
            search, momentum = current.copy(), 1.0
            continue
        change = np.abs(candidate - current).sum()
        next_momentum = (1 + np.sqrt(1 + 4 * momentum**2)) / 2
        search = candidate + (momentum - 1) / next_momentum * (candidate - current)
        current, value, momentum = candidate, candidate_value, next_momentum
        if change < tolerance:
            break
    return current
