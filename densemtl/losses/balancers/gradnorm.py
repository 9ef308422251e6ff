"""The ``gradnorm`` scheme: learnable weights that balance the tasks' gradient norms (Chen et al., 2018)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from densemtl.errors import ConfigError
from densemtl.losses.balancers.base import Balancer


class GradNormBalancer(Balancer):
    """GradNorm (Chen et al., 2018): learnable weights that equalise the gradient norms on the shared
    parameters, scaled by each task's relative inverse training rate to the power ``alpha``.

    The engine back-propagates ``sum w_t.detach() b_t L_t + L_grad``. ``L_grad = sum |G_t - target_t|``
    with ``G_t = w_t ||grad_shared(b_t L_t)||`` (the norm is computed with ``autograd.grad`` and
    detached, so ``L_grad`` moves only the weights, never the network) and
    ``target_t = mean(G) r_t^alpha`` (detached), ``r_t = (L_t/L_t(0)) / mean(L/L(0))``.
    The weights are renormalised to sum to the number of tasks at the start of each call, i.e.
    after every optimizer step. ``shared_parameters`` is required; the engine gives the whole backbone,
    which costs one extra backward through it per task and step: ``last_parameters: N`` keeps only the
    last N tensors of that list (the paper uses the last shared layer; 0 = all).
    """

    name = "gradnorm"

    def __init__(
        self, task_names: list[str], base_weights: dict[str, float], *, alpha: float = 1.5, last_parameters: int = 0
    ) -> None:
        super().__init__(task_names, base_weights)
        if last_parameters < 0:
            raise ConfigError(f"loss.balancer_args.last_parameters: must be 0 (all) or positive, got {last_parameters}")
        self.alpha = alpha
        self.last_parameters = last_parameters
        n = len(self.task_names)
        self.task_weights = nn.Parameter(torch.ones(n))
        self.register_buffer("initial_losses", torch.zeros(n))
        self.register_buffer("started", torch.zeros((), dtype=torch.bool))

    def combine(
        self, losses: dict[str, Tensor], step: int, shared_parameters: list[nn.Parameter] | None = None
    ) -> tuple[Tensor, dict[str, float]]:
        if not shared_parameters:
            raise ConfigError("loss.balancer: 'gradnorm' needs the shared parameters; the model gave none")
        if self.last_parameters:
            shared_parameters = shared_parameters[-self.last_parameters :]
        stacked = self._stack(losses)
        terms = self.base.to(stacked.device) * stacked
        present = self._present(losses, stacked.device)
        with torch.no_grad():
            self.task_weights.clamp_(min=1e-3)
            self.task_weights.mul_(len(self.task_names) / self.task_weights.sum())
            if not bool(self.started):
                self.initial_losses.copy_(terms.detach())
                self.started.fill_(True)
            first_seen = present.to(self.initial_losses.device) & (self.initial_losses == 0)  # partial labels
            self.initial_losses[first_seen] = terms.detach().to(self.initial_losses)[first_seen]
        norms = [self._norm(term, shared_parameters) if labelled else terms.new_zeros(())
                 for term, labelled in zip(terms, present.tolist(), strict=True)]
        weights = self.task_weights.to(stacked.device)
        grad_norms = weights * torch.stack(norms)
        with torch.no_grad():  # tasks without a label in the batch take no part in the targets
            ratio = terms.detach() / self.initial_losses.to(terms.device).clamp_min(1e-12)
            mean_ratio = ratio[present].mean().clamp_min(1e-12)
            target = grad_norms[present].mean() * (ratio / mean_ratio) ** self.alpha
        grad_loss = ((grad_norms - target).abs() * present).sum()
        total = (weights.detach() * terms).sum() + grad_loss
        return total, self._as_dict(weights.detach() * self.base.to(weights.device))

    @staticmethod
    def _norm(term: Tensor, shared_parameters: list[nn.Parameter]) -> Tensor:
        """``|grad_shared term|`` (detached)."""
        grads = torch.autograd.grad(term, shared_parameters, retain_graph=True, allow_unused=True)
        squares = [g.detach().pow(2).sum() for g in grads if g is not None]
        return torch.stack(squares).sum().sqrt() if squares else term.new_zeros(())
