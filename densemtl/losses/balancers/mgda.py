"""The ``mgda`` scheme: MGDA-UB, the min-norm point of the task gradients (Sener and Koltun, 2018)."""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import nnls

from densemtl.errors import ConfigError
from densemtl.losses.balancers.gradient import GradientBalancer

NORMALIZATIONS = ("none", "l2", "loss", "loss+")


class MGDABalancer(GradientBalancer):
    """MGDA-UB, "Multi-Task Learning as Multi-Objective Optimization" (Sener and Koltun, NeurIPS 2018).

    The weights ``a`` on the simplex minimise ``|sum_t a_t g_t|^2``: the min-norm point of the convex hull
    of the gradients, a direction that decreases every task's loss (zero at a Pareto-stationary point).
    ``gradients: representation`` (the default) is the paper's upper bound: the gradients are taken with respect
    to the shared representation, which needs one backward pass through the encoder instead of T.
    ``normalization`` divides each gradient by a normaliser before the min-norm problem (``l2``: its norm,
    which makes the weights independent of each loss's scale; ``loss``: its loss; ``loss+``: both, so the
    tasks enter as unit directions scaled by ``1 / L_t``); the weights then multiply the unnormalised
    gradients. The paper's text uses none; the authors' released configurations use ``loss+``, the
    default here.
    """

    name = "mgda"

    def __init__(
        self, task_names: list[str], base_weights: dict[str, float], *, gradients: str = "representation",
        normalization: str = "loss+",
    ) -> None:
        super().__init__(task_names, base_weights, gradients)
        if normalization not in NORMALIZATIONS:
            raise ConfigError(
                f"loss.balancer_args.normalization: expected one of {', '.join(NORMALIZATIONS)}, got {normalization!r}"
            )
        self.normalization = normalization

    def _normalizers(self, gram: np.ndarray, losses: np.ndarray) -> np.ndarray:
        norms = np.sqrt(gram.diagonal())
        by_name = {"none": np.ones_like(norms), "l2": norms, "loss": losses, "loss+": losses * norms}
        normalizers = by_name[self.normalization]
        return np.where(normalizers > 0, normalizers, 1.0)

    def _coefficients(self, gram: np.ndarray, losses: np.ndarray, step: int, tasks: torch.Tensor) -> np.ndarray:
        normalizers = self._normalizers(gram, losses)
        normed = gram / np.outer(normalizers, normalizers)
        return min_norm_weights(normed / max(np.abs(normed).max(), 1e-300))  # same minimiser, unit scale


def min_norm_weights(gram: np.ndarray) -> np.ndarray:
    """The weights ``w`` on the simplex minimising ``w.gram w``, exactly.

    They are ``u / sum(u)`` for the non-negative least-squares solution ``u`` of
    ``min_{u >= 0} u.gram u + (sum(u) - 1)^2``: its optimality conditions, divided by ``sum(u)``, are those
    of the min-norm point (``(gram w)_t >= w.gram w``, with equality where ``w_t > 0``). The quadratic is
    written as ``|M u - b|^2`` with ``M^T M = gram + 1 1^T`` and ``M^T b = 1``.
    """
    count = len(gram)
    values, vectors = np.linalg.eigh(gram + np.ones((count, count)))
    matrix = (vectors * np.sqrt(np.clip(values, 0.0, None))).T
    target = np.linalg.lstsq(matrix.T, np.ones(count), rcond=None)[0]
    weights, _ = nnls(matrix, target)
    return weights / weights.sum()
