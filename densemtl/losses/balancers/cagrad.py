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
    the simplex minimising ``g_w . g_0 + c |g_0| |g_w|`` (the dual; solved here by an interior-point method on
    the T-dimensional simplex, where the authors call scipy's SLSQP). ``rescale`` 1 divides ``d`` by
    ``1 + c^2`` (2: by ``1 + c``, 0: none), as the authors' code does by default. Defaults: ``c = 0.4``, the
    value of the authors' NYUv2 dense-prediction runs, and ``rescale = 1``.
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

        def objective(w: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
            product = normed @ w
            root = np.sqrt(max(float(w @ product), 1e-16))
            hessian = self.c * (normed / root - np.outer(product, product) / root**3)
            return float(w @ towards_mean) + self.c * root, towards_mean + self.c * product / root, hessian

        w = minimize_on_simplex(objective, count)
        reach = self.c / np.sqrt(max(float(w @ normed @ w), 1e-16))  # c |g_0| / |g_w|
        coefficients = np.full(count, 1.0 / count) + reach * w
        return coefficients / {0: 1.0, 1: 1 + self.c**2, 2: 1 + self.c}[self.rescale]


ValueGradientHessian = Callable[[np.ndarray], tuple[float, np.ndarray, np.ndarray]]


def minimize_on_simplex(objective: ValueGradientHessian, size: int) -> np.ndarray:
    """Minimise a convex function over the probability simplex by a log-barrier interior-point method:
    equality-constrained Newton steps on ``f(w) - mu sum log w`` for ``mu`` from 0.1 down to 1e-11
    (``objective(w) -> (value, gradient, Hessian)``). A few dozen T x T solves, accurate to ~1e-9."""
    w = np.full(size, 1.0 / size)

    def barrier(point: np.ndarray, mu: float) -> float:
        return objective(point)[0] - mu * np.log(point).sum()

    for mu in 10.0 ** -np.arange(1, 13, 2):
        for _ in range(30):
            _, gradient, hessian = objective(w)
            gradient = gradient - mu / w
            system = np.zeros((size + 1, size + 1))
            system[:size, :size] = hessian + np.diag(mu / w**2)
            system[:size, size] = system[size, :size] = 1.0
            step = np.linalg.solve(system, np.concatenate([-gradient, [0.0]]))[:size]
            decrement = -(gradient @ step)
            if decrement < 1e-12 * mu:
                break
            length, current = 1.0, barrier(w, mu)
            while np.any(w + length * step <= 0) or barrier(w + length * step, mu) > current - length * decrement / 4:
                length *= 0.5
            w = w + length * step
    return w / w.sum()
