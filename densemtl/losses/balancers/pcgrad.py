"""The ``pcgrad`` scheme: project away the conflicting part of each task's gradient (Yu et al., 2020)."""

from __future__ import annotations

import numpy as np
import torch

from densemtl.losses.balancers.gradient import GradientBalancer


class PCGradBalancer(GradientBalancer):
    """PCGrad, "Gradient Surgery for Multi-Task Learning" (Yu et al., NeurIPS 2020).

    For each task ``i``, the other tasks ``j`` in a random order: when ``g_i . g_j < 0``, ``g_i`` loses its
    component along ``g_j`` (``g_i -= (g_i . g_j / |g_j|^2) g_j``, against the original ``g_j``); the update is
    the sum of the projected gradients. The method has no hyper-parameter. The random orders come from
    ``seed`` and the step, so every process draws the same ones and a resumed run the same as before.
    Projections are tracked as coefficients over the original gradients, so only the Gram matrix is needed.
    """

    name = "pcgrad"

    def __init__(
        self, task_names: list[str], base_weights: dict[str, float], *, gradients: str = "parameters", seed: int = 0
    ) -> None:
        super().__init__(task_names, base_weights, gradients)
        self.seed = seed

    def _coefficients(self, gram: np.ndarray, losses: np.ndarray, step: int, tasks: torch.Tensor) -> np.ndarray:
        count = len(gram)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        rows = np.eye(count)  # row i: the projected g_i as a combination of the original gradients
        for i in range(count):
            for j in torch.randperm(count, generator=generator).tolist():
                if j == i:
                    continue
                dot = rows[i] @ gram[:, j]
                if dot < 0:
                    rows[i, j] -= dot / gram[j, j]
        return rows.sum(axis=0)
