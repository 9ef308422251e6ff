"""Hard-concrete gates (Louizos, Welling, Kingma 2018) for sparse weight deltas with an L0 penalty.

A gate ``z`` in [0, 1] per element: during training ``s = sigmoid((log u - log(1 - u) + log_alpha) / beta)``
with ``u ~ U(0, 1)``, stretched to ``(l, r) = (-1.5, 1.5)`` and clipped, so exact zeros (and ones) have a
non-zero probability; at test time ``z = clip(sigmoid(log_alpha) (r - l) + l, 0, 1)``. The expected number
of non-zero gates, ``sum sigmoid(log_alpha - beta log(-l / r))``, is differentiable and is the L0 penalty.
The temperature ``beta`` is 1 by default, as in the released code of computation sharing (its sampler
has no temperature); Louizos et al.'s 2/3 is an option.

``log_alpha = scale * raw`` with ``raw`` the trained parameter: ``scale`` acts as a learning-rate multiplier
for the gates under Adam (whose steps are about ``lr`` in ``raw``), so the gates can open or close within
a few hundred steps while the weight deltas train at the ordinary rate.

Once frozen (:meth:`HardConcreteGate.freeze`), the gate is the fixed binary mask of its test-time non-zeros.
"""

from __future__ import annotations

import math

import torch
from torch import nn

STRETCH_LOW = -1.5
STRETCH_HIGH = 1.5


class HardConcreteGate(nn.Module):
    """One hard-concrete gate per element of a tensor of ``shape`` (``()``: one gate for a whole tensor)."""

    def __init__(
        self, shape: tuple[int, ...], init: float = 5.0, scale: float = 1.0, temperature: float = 1.0
    ) -> None:
        super().__init__()
        self.scale = scale
        self.temperature = temperature
        self.raw = nn.Parameter(torch.full(shape, init / scale))
        self.register_buffer("mask", torch.ones(shape, dtype=torch.bool))
        self.register_buffer("frozen", torch.tensor(False))

    @property
    def log_alpha(self) -> torch.Tensor:
        return self.raw * self.scale

    def forward(self) -> torch.Tensor:
        """The gate values: a sample in training, the deterministic gate in eval, the mask once frozen."""
        if bool(self.frozen) or not self.training:
            return self.deterministic()
        u = torch.rand_like(self.raw).clamp(1e-6, 1 - 1e-6)
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + self.log_alpha) / self.temperature)
        return (s * (STRETCH_HIGH - STRETCH_LOW) + STRETCH_LOW).clamp(0.0, 1.0)

    def deterministic(self) -> torch.Tensor:
        """The test-time gate (or the frozen mask), whatever the module's mode."""
        if bool(self.frozen):
            return self.mask.to(self.raw.dtype)
        s = torch.sigmoid(self.log_alpha)
        return (s * (STRETCH_HIGH - STRETCH_LOW) + STRETCH_LOW).clamp(0.0, 1.0)

    def expected_l0(self) -> torch.Tensor:
        """Expected number of non-zero gates (differentiable in ``log_alpha``); the mask count once frozen."""
        if bool(self.frozen):
            return self.mask.sum().to(self.raw.dtype)
        shift = self.temperature * math.log(-STRETCH_LOW / STRETCH_HIGH)
        return torch.sigmoid(self.log_alpha - shift).sum()

    @torch.no_grad()
    def freeze(self) -> torch.Tensor:
        """Fix the mask to the test-time non-zeros; returns the test-time gate values (to fold into deltas)."""
        values = self.deterministic()
        self.mask.copy_(values > 0)
        self.frozen.fill_(True)
        self.raw.requires_grad_(False)
        return values
