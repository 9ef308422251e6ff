"""Gradient-manipulating balancers: schemes that combine the tasks' gradients of the shared part.

A :class:`GradientBalancer` asks the engine for per-task gradients (``needs_task_gradients``). The
total it returns from :meth:`~GradientBalancer.combine` is ``sum_t b_t L_t``, as for ``fixed``, so
every task-specific parameter (heads, decoders) gets its own task's gradient untouched. For the shared
part the engine (:mod:`densemtl.engine.task_gradients`) back-propagates each term ``b_t L_t`` on its
own, unscales and averages those gradients over processes and micro-batches, and replaces the shared
gradient ``sum_t g_t`` by ``sum_t c_t g_t`` with the coefficients ``c`` of :meth:`~GradientBalancer.combination`.

Every scheme here is a function of the Gram matrix ``K = G G^T`` (T x T) of the task gradients:
PCGrad's projections, CAGrad's and MGDA's problems on the simplex and Nash-MTL's bargaining
condition all only take inner products. So the same coefficients apply to the gradients of the shared
parameters (``gradients: parameters``) or, with ``gradients: representation``, to the gradients of the shared
representation (the tensors the task-specific modules take in): there the per-task backward passes stop
at the representation (cheaper), and the Gram matrix of a batch split over processes is the sum of
theirs. Tasks whose gradient is exactly zero (no labelled sample in the batch) are left out of the
scheme and get a zero coefficient.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from densemtl.errors import ConfigError
from densemtl.losses.balancers.base import Balancer

GRADIENT_SOURCES = ("parameters", "representation")


class GradientBalancer(Balancer):
    """Combines per-task gradients of the shared part; subclasses implement :meth:`_coefficients`.

    ``gradients``: ``parameters`` (the shared parameters' gradients) or ``representation`` (the gradients of the
    shared representation, then back-propagated through the shared part once).
    """

    needs_task_gradients: ClassVar[bool] = True

    def __init__(self, task_names: list[str], base_weights: dict[str, float], gradients: str = "parameters") -> None:
        super().__init__(task_names, base_weights)
        if gradients not in GRADIENT_SOURCES:
            raise ConfigError(
                f"loss.balancer_args.gradients: expected {' or '.join(GRADIENT_SOURCES)}, got {gradients!r}"
            )
        self.gradients = gradients
        self._terms: Tensor | None = None
        self.register_buffer("last_coefficients", torch.ones(len(self.task_names), dtype=torch.float64))

    def combine(
        self, losses: dict[str, Tensor], step: int, shared_parameters: list[nn.Parameter] | None = None
    ) -> tuple[Tensor, dict[str, float]]:
        """``sum_t b_t L_t`` (what the task-specific parameters see); the terms wait for :meth:`take_terms`."""
        stacked = self._stack(losses)
        base = self.base.to(stacked.device)
        self._terms = base * stacked
        return self._terms.sum(), self._as_dict(base)

    def take_terms(self) -> Tensor:
        """The per-task terms ``b_t L_t`` of the last :meth:`combine` (the engine back-propagates each);
        zeros when the objective had no labelled task to combine."""
        terms, self._terms = self._terms, None
        return terms if terms is not None else torch.zeros(len(self.task_names))

    def combination(self, gram: Tensor, losses: Tensor, step: int) -> Tensor:
        """Coefficients ``c`` (float64, T) of the shared update ``sum_t c_t g_t``.

        ``gram``: inner products of the task gradients (T x T), ``losses``: the terms ``b_t L_t`` (T),
        ``step``: the optimiser step. Tasks with a zero gradient get 0 and are not shown to the scheme.
        """
        gram = gram.detach().double().cpu()
        coefficients = torch.zeros(len(self.task_names), dtype=torch.float64)
        active = torch.nonzero(gram.diagonal() > 0).flatten()
        if len(active):
            sub = gram[active][:, active]
            chosen = self._coefficients(sub.numpy(), losses.detach().double().cpu()[active].numpy(), step, active)
            coefficients[active] = torch.from_numpy(np.asarray(chosen, dtype=np.float64))
        self.last_coefficients.copy_(coefficients)
        return coefficients

    def combine_gradients(self, grads: Tensor, losses: Tensor, step: int) -> Tensor:
        """The combined gradient (P) of per-task gradient vectors ``grads`` (T x P)."""
        wide = grads.double()
        coefficients = self.combination(wide @ wide.T, losses, step)
        return (coefficients.to(grads.device) @ wide).to(grads.dtype)

    def shared_weights(self) -> dict[str, float]:
        """The factor in front of each ``grad L_t`` in the last shared update (``c_t b_t``), for logging."""
        return self._as_dict(self.last_coefficients.float() * self.base.cpu())

    def _coefficients(self, gram: np.ndarray, losses: np.ndarray, step: int, tasks: Tensor) -> np.ndarray:
        """The scheme: coefficients for the active tasks ``tasks`` (indices) from their Gram matrix."""
        raise NotImplementedError
