"""Per-task gradients of the shared part, for the gradient-manipulating balancers.

A balancer with ``needs_task_gradients`` (:class:`~densemtl.losses.balancers.gradient.GradientBalancer`)
returns ``sum_t b_t L_t`` from ``combine`` and keeps the terms. :class:`TaskGradients` then, per
micro-batch, back-propagates each term on its own to the shared part before the usual backward of the
total, and, once per optimiser step, replaces the shared gradient ``sum_t g_t`` by the balancer's
``sum_t c_t g_t``. Task-specific parameters keep the gradient of the total: their own task's, untouched.

Which parameters are shared is read from the module names, as ``bench`` attributes parameters: a
parameter is task ``t``'s when ``t`` is a component of its dotted name (``heads.depth.conv.weight``),
shared otherwise (the backbone, a shared neck).

- ``gradients: parameters``: the gradients ``g_t`` of the shared parameters are summed over micro-batches,
  unscaled (fp16 loss scaling) and averaged over processes before the balancer sees them, so two
  processes with batch B give the update of one process with batch 2B; the correction
  ``sum c_t g_t - sum g_t`` is added to the shared parameters' (already averaged) gradients.
- ``gradients: representation``: the per-task backward passes stop at the shared representation, the inputs of
  the outermost task-specific modules that no task-specific module produced. The Gram matrix of these
  gradients is summed over processes (divided by the squared number of processes, which makes it the
  Gram matrix of the global batch's mean loss), the balancer's coefficients are computed before the
  backward pass, and one backward pass from the total and the representation (seeded with
  ``sum (c_t - 1) dL_t/dz``) gives every parameter its gradient. Needs ``train.accumulate: 1``.

Steps whose per-task gradients are not finite (an fp16 overflow) are left alone: the gradients then hold
the overflow, the loss scaler skips the step and lowers its scale, and the balancer's state is unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from densemtl.engine import distributed
from densemtl.errors import ConfigError
from densemtl.losses.balancers.gradient import GradientBalancer


def shared_parameters_by_name(
    model: nn.Module, task_names: list[str], trainable: list[nn.Parameter]
) -> list[nn.Parameter]:
    """The trainable parameters of ``model`` that no task owns by name (see the module docstring)."""
    allowed = {id(p) for p in trainable if p.requires_grad}
    tasks = set(task_names)
    return [param for name, param in model.named_parameters()
            if id(param) in allowed and not tasks.intersection(name.split("."))]


def _tensors(value: Any) -> Iterator[Tensor]:
    """The tensors in a module's inputs or outputs (nested tuples, lists and dicts)."""
    if torch.is_tensor(value):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)


class RepresentationCapture:
    """Records, during a training forward pass, the shared representation: the tensor inputs of the
    outermost task-specific modules that are not outputs of a task-specific module."""

    def __init__(self, model: nn.Module, task_names: list[str]) -> None:
        tasks = set(task_names)
        owned = [(name, module) for name, module in model.named_modules() if name.split(".")[-1] in tasks]
        outermost = [(name, module) for name, module in owned
                     if not any(name.startswith(other + ".") for other, _ in owned)]
        if not outermost:
            raise ConfigError("loss.balancer_args.gradients: representation needs task-specific modules named by task "
                              "(e.g. heads.<task>); this model has none")
        self.inputs: dict[int, Tensor] = {}
        self.produced: set[int] = set()
        for _, module in outermost:
            module.register_forward_pre_hook(self._record_inputs)
            module.register_forward_hook(self._record_outputs)

    def _active(self, module: nn.Module) -> bool:
        return module.training and torch.is_grad_enabled()

    def _record_inputs(self, module: nn.Module, args: tuple) -> None:
        if self._active(module):
            for tensor in _tensors(args):
                if tensor.requires_grad and id(tensor) not in self.produced:
                    self.inputs.setdefault(id(tensor), tensor)

    def _record_outputs(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self._active(module):
            self.produced.update(id(tensor) for tensor in _tensors(output))

    def take(self) -> list[Tensor]:
        """The representation of the last forward pass (forgotten here)."""
        tensors = list(self.inputs.values())
        self.inputs, self.produced = {}, set()
        if not tensors:
            raise RuntimeError("no shared representation was recorded in the forward pass")
        return tensors


def _flat(grads: tuple[Tensor | None, ...], like: list[Tensor]) -> Tensor:
    """One float32 vector of gradients (zeros where a tensor got none)."""
    pairs = zip(grads, like, strict=True)
    parts = [(g if g is not None else torch.zeros_like(t)).reshape(-1).float() for g, t in pairs]
    return torch.cat(parts)


class TaskGradients:
    """The per-task gradient path of one training phase (see the module docstring)."""

    def __init__(
        self, model: nn.Module, balancer: GradientBalancer, trainable: list[nn.Parameter], accumulate: int,
    ) -> None:
        self.balancer = balancer
        self.shared = shared_parameters_by_name(model, balancer.task_names, trainable)
        self.capture = None
        if balancer.gradients == "representation":
            if accumulate != 1:
                raise ConfigError("loss.balancer_args.gradients: representation needs train.accumulate 1 (the weights "
                                  "must be known before the backward pass)")
            self.capture = RepresentationCapture(model, balancer.task_names)
        self.rows: Tensor | None = None  # parameters: per-task gradients summed over micro-batches (T x P)
        self.losses = torch.zeros(len(balancer.task_names))
        self.skipped = False

    def backward(self, total: Tensor, scaler: torch.amp.GradScaler, accumulate: int, step: int) -> None:
        """Back-propagate one micro-batch's ``total`` (already divided by ``accumulate``) and record the
        per-task gradients; replaces ``scaler.scale(total).backward()``."""
        terms = self.balancer.take_terms() / accumulate
        self.losses = self.losses.to(terms.device) + terms.detach().float()
        if self.capture is not None:
            self._representation_backward(total, terms, scaler, step)
            return
        rows = []
        for term in terms:
            if not self.shared or not term.requires_grad:
                rows.append(torch.zeros(sum(p.numel() for p in self.shared), device=total.device))
                continue
            grads = torch.autograd.grad(scaler.scale(term), self.shared, retain_graph=True, allow_unused=True)
            rows.append(_flat(grads, self.shared))
        stacked = torch.stack(rows)
        self.rows = stacked if self.rows is None else self.rows + stacked
        scaler.scale(total).backward()

    def _representation_backward(self, total: Tensor, terms: Tensor, scaler: torch.amp.GradScaler, step: int) -> None:
        reps = self.capture.take()
        per_task: list[tuple[Tensor | None, ...]] = []
        for term in terms:
            zero = not term.requires_grad
            per_task.append((None,) * len(reps) if zero else
                            torch.autograd.grad(scaler.scale(term), reps, retain_graph=True, allow_unused=True))
        gram = torch.zeros(len(terms), len(terms), dtype=torch.float64, device=total.device)
        for index, rep in enumerate(reps):
            rows = torch.stack([_flat((grads[index],), [rep]) for grads in per_task]).double()
            gram += rows @ rows.T
        scale = scaler.get_scale() if scaler.is_enabled() else 1.0
        world = torch.distributed.get_world_size() if distributed.is_active() else 1
        gram = distributed.all_reduce_sum(gram) / (scale**2 * world**2)
        losses = distributed.all_reduce_mean(self.losses)
        self.losses = torch.zeros_like(self.losses)
        self.skipped = not bool(torch.isfinite(gram).all())
        if self.skipped:
            scaler.scale(total).backward()
            return
        coefficients = self.balancer.combination(gram, losses, step).tolist()
        roots, seeds = [scaler.scale(total)], [torch.ones_like(total)]
        for index, rep in enumerate(reps):
            parts = [(c - 1.0) * grads[index] for c, grads in zip(coefficients, per_task, strict=True)
                     if grads[index] is not None]
            if parts:
                roots.append(rep)
                seeds.append(torch.stack(parts).sum(0).to(rep.dtype))
        torch.autograd.backward(roots, seeds)

    def finish(self, scaler: torch.amp.GradScaler, step: int) -> dict[str, float]:
        """After the last micro-batch and ``scaler.unscale_``: combine and write the shared gradients;
        returns the figures to log (each task's factor in the shared update)."""
        if self.capture is None:
            self._combine_parameters(scaler, step)
        figures = {f"shared_weight/{name}": value for name, value in self.balancer.shared_weights().items()}
        figures["skipped_combination"] = float(self.skipped)
        return figures

    def _combine_parameters(self, scaler: torch.amp.GradScaler, step: int) -> None:
        rows, self.rows = self.rows, None
        losses = distributed.all_reduce_mean(self.losses)
        self.losses = torch.zeros_like(self.losses)
        if rows is None or not self.shared:
            return
        if scaler.is_enabled():
            rows = rows * (1.0 / scaler.get_scale())
        rows = distributed.all_reduce_mean(rows)
        self.skipped = not bool(torch.isfinite(rows).all())
        if self.skipped:
            return
        correction = self.balancer.combine_gradients(rows, losses, step) - rows.sum(0)
        offset = 0
        for param in self.shared:
            size = param.numel()
            if param.grad is not None:
                param.grad.add_(correction[offset : offset + size].view_as(param).to(param.grad.dtype))
            offset += size


def build_task_gradients(
    model: nn.Module, balancer: nn.Module, trainable: list[nn.Parameter], accumulate: int
) -> TaskGradients | None:
    """The per-task gradient path when the balancer asks for it (else None)."""
    if not getattr(balancer, "needs_task_gradients", False):
        return None
    return TaskGradients(model, balancer, trainable, accumulate)
