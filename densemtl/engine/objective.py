"""The training objective: per-task losses, deep supervision, balancing, extra terms, regularizer.

``total = balancer.combine({t: L_t}) + deep supervision + sum(model extra_losses) + sum(hook losses) +
regularizer``. ``L_t = Task.loss(pred_t, target_t)`` and, with ``mtcp.deep_supervision: official`` (as
MT-CP's released code), deep supervision is ``traceback_weight * sum_t sum_i Task.loss(intermediate_t_i,
target_t)`` outside the balancer: neither the task weights nor a dynamic balancer scale it, and the
balancer's statistics see only the final outputs. With ``in_task`` the same sum of each task is added to
``L_t`` instead, so the task's weight and the balancer apply to it. Deep-supervision outputs smaller than
their target are upsampled to it (bilinear, as the released code does). A non-finite term stops training
with :class:`TrainingDiverged` naming it.

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


def to_target_size(raw: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A raw output upsampled (bilinear) to its target's height and width."""
    if tuple(raw.shape[-2:]) == tuple(target.shape[-2:]):
        return raw
    return F.interpolate(raw, size=tuple(target.shape[-2:]), mode="bilinear", align_corners=False)


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
        traceback_weight: float = 0.5, deep_supervision: str = "official",
    ) -> None:
        super().__init__()
        self.tasks = tasks
        self.balancer = balancer
        self.regularizer = regularizer
        self.traceback_weight = traceback_weight
        self.deep_supervision_in_task = deep_supervision == "in_task"
        self.extra_terms: list[torch.Tensor] = []  # kept for the per-task gradient path (engine/task_gradients.py)

    def task_losses(
        self, output: ModelOutput, batch: dict[str, Any]
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor | None]:
        """Each task's loss for the balancer, the parts to log, and the deep-supervision term kept
        outside the balancer (None when there is none or it sits inside the task losses)."""
        losses: dict[str, torch.Tensor] = {}
        parts: dict[str, torch.Tensor] = {}
        outside = []
        intermediate = output.get("intermediate") or {}
        for name, task in self.tasks.items():
            present = labelled_mask(batch, name)
            if present is not None and not bool(present.any()):
                continue  # no label in this batch
            target = _labelled(present, batch[name])
            loss = task.loss(_labelled(present, output["pred"][name]), target)
            parts[name] = loss
            extras = [task.loss(to_target_size(_labelled(present, raw), target), target)
                      for raw in intermediate.get(name, [])]
            if extras:
                deep = torch.stack(extras).sum()
                parts[f"{name}_intermediate"] = deep
                if self.deep_supervision_in_task:
                    loss = loss + self.traceback_weight * deep
                else:
                    outside.append(deep)
            losses[name] = loss
        deep_term = self.traceback_weight * torch.stack(outside).sum() if outside else None
        return losses, parts, deep_term

    def forward(
        self,
        output: ModelOutput,
        batch: dict[str, Any],
        step: int,
        shared: list[nn.Parameter],
        extra: dict[str, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(total, figures)``; figures hold each task's loss, its weight and every extra term."""
        losses, parts, deep_term = self.task_losses(output, batch)
        check_finite(parts, step)
        total, weights = self.balancer.combine(losses, step, shared) if losses else (0.0, {})
        total = total + unlabelled_outputs(output, set(self.tasks) - set(losses))
        figures = {f"loss/{name}": value.detach() for name, value in parts.items()}
        figures.update({f"weight/{name}": torch.as_tensor(float(w)) for name, w in weights.items()})
        terms = {} if deep_term is None else {"deep_supervision": deep_term}
        terms.update(output.get("extra_losses") or {})
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
    return Objective(tasks, balancer, regularizer, config.mtcp.traceback_weight, config.mtcp.deep_supervision)
