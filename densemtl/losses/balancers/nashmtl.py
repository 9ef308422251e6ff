"""The ``nashmtl`` scheme: the Nash bargaining solution over the task gradients (Navon et al., 2022)."""

from __future__ import annotations

import numpy as np
import torch

from densemtl.errors import ConfigError
from densemtl.losses.balancers.gradient import GradientBalancer

RIDGE = 1e-8  # keeps the bargaining problem bounded when a non-negative mix of gradients cancels


class NashMTLBalancer(GradientBalancer):
    """Nash-MTL, "Multi-Task Learning as a Bargaining Game" (Navon et al., ICML 2022).

    The update ``d = sum_t a_t g_t`` with ``a > 0`` solving ``K a = 1 / a`` (element-wise): each task's
    share of the update, ``g_t . d``, is ``1 / a_t``, the Nash bargaining solution of the tasks. As in the
    authors' implementation, ``K`` is the Gram matrix divided by its Frobenius norm (the weights do not
    depend on the scale of the losses), the weights are recomputed every ``update_every`` steps (the last
    ones are reused in between; the per-task backward passes still run, since the heads keep their own
    gradients, so what is saved is the solver) and the update's norm is clipped to ``max_norm`` (0: no
    clip). The condition is solved by damped Newton on the strictly convex ``a.K a / 2 - sum log a``, warm-
    started from the previous weights, ``iterations`` at most (the authors run 20 steps of a
    concave-convex procedure with an external solver instead). Defaults, the paper's: ``update_every 1``,
    ``max_norm 1.0``, ``iterations 20``.
    """

    name = "nashmtl"

    def __init__(
        self, task_names: list[str], base_weights: dict[str, float], *, gradients: str = "parameters",
        update_every: int = 1, max_norm: float = 1.0, iterations: int = 20,
    ) -> None:
        super().__init__(task_names, base_weights, gradients)
        if update_every < 1 or iterations < 1:
            raise ConfigError(
                f"loss.balancer_args: update_every and iterations must be at least 1, got {update_every}, {iterations}"
            )
        if not 0 <= max_norm < float("inf"):
            raise ConfigError(f"loss.balancer_args.max_norm: must be a finite number >= 0 (0: no clip), got {max_norm}")
        self.update_every = update_every
        self.max_norm = max_norm
        self.iterations = iterations
        self.register_buffer("alpha", torch.ones(len(self.task_names), dtype=torch.float64))

    def _coefficients(self, gram: np.ndarray, losses: np.ndarray, step: int, tasks: torch.Tensor) -> np.ndarray:
        previous = self.alpha[tasks].numpy()
        if step % self.update_every == 0:
            normed = gram / np.linalg.norm(gram) + RIDGE * np.eye(len(gram))
            alpha = bargaining_weights(normed, previous, self.iterations)
            self.alpha[tasks] = torch.from_numpy(alpha)
        else:
            alpha = previous
        norm = np.sqrt(max(float(alpha @ gram @ alpha), 0.0))
        if self.max_norm > 0 and norm > self.max_norm:
            alpha = alpha * (self.max_norm / norm)
        return alpha


def bargaining_weights(gram: np.ndarray, start: np.ndarray, iterations: int) -> np.ndarray:
    """``a > 0`` with ``gram @ a = 1 / a``: the minimiser of ``a.gram a / 2 - sum log a`` by damped Newton."""

    def value(a: np.ndarray) -> float:
        return float(a @ gram @ a / 2 - np.log(a).sum())

    alpha = np.where(start > 0, start, 1.0)
    for _ in range(iterations):
        gradient = gram @ alpha - 1 / alpha
        if np.linalg.norm(gradient * alpha) < 1e-10:  # residual of a_t (K a)_t = 1, near float64 rounding
            break
        direction = np.linalg.solve(gram + np.diag(1 / alpha**2), gradient)
        step, current = 1.0, value(alpha)
        while np.any(alpha - step * direction <= 0) or value(alpha - step * direction) > current - 1e-4 * step * (
            gradient @ direction
        ):
            step *= 0.5
            if step < 1e-12:
                return alpha
        alpha = alpha - step * direction
    return alpha
