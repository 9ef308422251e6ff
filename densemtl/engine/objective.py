"""The training objective: per-task losses, deep supervision, balancing, extra terms, regularizer.

``total = balancer.combine({t: L_t}) + sum(model extra_losses) + sum(hook losses) + regularizer``, where
``L_t = Task.loss(pred_t, target_t) + traceback_weight * sum_i Task.loss(intermediate_t_i, target_t
resized nearest)``: deep-supervision outputs belong to their task, so the task's weight applies to them.
A non-finite term stops training with :class:`TrainingDiverged` naming it.

Partial labels: ``L_t`` is computed on the samples of the batch that have task ``t``'s label
(:func:`densemtl.data.base.labelled_mask`), so it is their mean; a task without any labelled sample in the
batch is left out of the losses the balancer sees, and its outputs enter the total multiplied by zero, so
every parameter still takes part in the backward pass (DDP requires it) and nothing is divided by zero.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from densemtl.config import Config
from densemtl.data.base import labelled_mask
from densemtl.errors import TrainingDiverged
from densemtl.models.output import ModelOutput
from densemtl.tasks import Task


def resize_target(target: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A batch target (B x H x W labels or B x C x H x W maps) resized with nearest neighbour."""
    if tuple(target.shape[-2:]) == tuple(size):
        return target
    if target.dim() == 3:
        return F.interpolate(target[:, None].float(), size=size, mode="nearest")[:, 0].to(target.dtype)
    return F.interpolate(target.float(), size=size, mode="nearest").to(target.dtype)


def shared_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters all tasks share (the backbone's when the model has one), for gradient-based balancers."""
    model = getattr(model, "module", model)
    owner = getattr(model, "backbone", None)
    params = (owner if isinstance(owner, nn.Module) else model).parameters()
    return [p for p in params if p.requires_grad]


def _labelled(present: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
    """The samples of ``value`` (batch first) that have the label (all when ``present`` is None)."""
    return value if present is None else value[present.to(value.device)]


def unlabelled_outputs(output: ModelOutput, tasks: set[str]) -> torch.Tensor | float:
    """Zero, computed from every output of ``tasks``: keeps their heads in the backward pass."""
    intermediate = output.get("intermediate") or {}
    raws = [raw for t in sorted(tasks) for raw in [output["pred"][t], *intermediate.get(t, [])]]
    return torch.stack([raw.float().sum() for raw in raws]).sum() * 0.0 if raws else 0.0


def check_finite(terms: dict[str, torch.Tensor], step: int) -> None:
    """Raise :class:`TrainingDiverged` naming the first non-finite term (one device sync for all)."""
    if not terms:
        return
    values = torch.stack([value.detach().float().reshape(()) for value in terms.values()])
    if bool(torch.isfinite(values).all()):
        return
    for name, value in terms.items():
        if not torch.isfinite(value.detach()).all():
            raise TrainingDiverged(
                f"loss of '{name}' is {value.item()} at step {step}; stopped, the last good checkpoint is kept"
            )


class Objective(nn.Module):
    """Turns a model output and a batch into the loss to back-propagate and the figures to log.

    The balancer and the regularizer are modules so their learnable parameters reach the optimiser and
    their state reaches checkpoints.
    """

    def __init__(
        self, tasks: dict[str, Task], balancer: nn.Module, regularizer: nn.Module | None = None,
        traceback_weight: float = 0.5,
    ) -> None:
        super().__init__()
        self.tasks = tasks
        self.balancer = balancer
        self.regularizer = regularizer
        self.traceback_weight = traceback_weight
        self.extra_terms: list[torch.Tensor] = []  # kept for the per-task gradient path (engine/task_gradients.py)

    def task_losses(self, output: ModelOutput, batch: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict]:
        """Each labelled task's loss (final + weighted deep supervision) and the parts to log."""
        losses: dict[str, torch.Tensor] = {}
        parts: dict[str, torch.Tensor] = {}
        intermediate = output.get("intermediate") or {}
        for name, task in self.tasks.items():
            present = labelled_mask(batch, name)
            if present is not None and not bool(present.any()):
                continue  # no label in this batch
            target = _labelled(present, batch[name])
            loss = task.loss(_labelled(present, output["pred"][name]), target)
            parts[name] = loss
            extras = [task.loss(raw, resize_target(target, raw.shape[-2:]))
                      for raw in (_labelled(present, side) for side in intermediate.get(name, []))]
            if extras:
                deep = torch.stack(extras).sum()
                parts[f"{name}_intermediate"] = deep
                loss = loss + self.traceback_weight * deep
            losses[name] = loss
        return losses, parts

    def forward(
        self,
        output: ModelOutput,
        batch: dict[str, Any],
        step: int,
        shared: list[nn.Parameter],
        extra: dict[str, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(total, figures)``; figures hold each task's loss, its weight and every extra term."""
        losses, parts = self.task_losses(output, batch)
        check_finite(parts, step)
        total, weights = self.balancer.combine(losses, step, shared) if losses else (0.0, {})
        total = total + unlabelled_outputs(output, set(self.tasks) - set(losses))
        figures = {f"loss/{name}": value.detach() for name, value in parts.items()}
        figures.update({f"weight/{name}": torch.as_tensor(float(w)) for name, w in weights.items()})
        terms = dict(output.get("extra_losses") or {})
        terms.update(extra or {})
        if self.regularizer is not None:
            terms["contrastive"] = self.regularizer(output["features"], batch)
        check_finite(terms, step)
        if getattr(self.balancer, "needs_task_gradients", False):
            self.extra_terms = list(terms.values())
        for name, value in terms.items():
            total = total + value
            figures[f"loss/{name}"] = value.detach()
        check_finite({"total": total}, step)
        figures["loss/total"] = total.detach()
        return total, figures


def build_objective(
    config: Config, tasks: dict[str, Task], feature_channels: dict[str, int], steps_per_epoch: int | None = None
) -> Objective:
    """The objective the config asks for: its balancer and, when enabled, the contrastive regularizer.

    ``steps_per_epoch`` is the default window of the epoch-based balancers (DWA, LPS).
    """
    from densemtl.losses.balancers import build_balancer

    regularizer = None
    if config.contrastive.enabled:
        from densemtl.losses.contrastive import ContrastiveRegularizer

        regularizer = ContrastiveRegularizer(config.contrastive, tasks, feature_channels)
    balancer = build_balancer(config.loss, list(tasks), steps_per_epoch)
    return Objective(tasks, balancer, regularizer, config.mtcp.traceback_weight)
