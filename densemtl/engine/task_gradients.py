"""Per-task gradients of the shared part, for the gradient-manipulating balancers.

A balancer with ``needs_task_gradients`` (:class:`~densemtl.losses.balancers.gradient.GradientBalancer`)
returns ``sum_t b_t L_t`` from ``combine`` and keeps the terms. :class:`TaskGradients` back-propagates
each term on its own to the shared part, and the shared gradient becomes the balancer's
``sum_t c_t g_t`` plus the gradient of the objective's extra terms (regularizers), which pass untouched.
Task-specific parameters get the gradient of the total: their own task's, untouched.

Which parameters are shared is read from the module names, as ``bench`` attributes parameters: a
parameter is task ``t``'s when ``t`` is a component of its dotted name (``heads.depth.conv.weight``),
shared otherwise (the backbone, a shared neck).

- ``gradients: parameters``: the gradients ``g_t`` of the shared parameters (and of the extra terms) are
  summed over micro-batches, unscaled (fp16 loss scaling) and averaged over processes before the balancer
  sees them, so two processes with batch B give the update of one process with batch 2B; the shared
  parameters' gradients are then overwritten (not corrected, so no rounding noise from a subtraction).
- ``gradients: representation``: the shared representation is the tensors the outermost task-specific
  modules take in, unless a task-specific module produced them. During a training forward pass each is
  handed to those modules as a detached copy, which cuts the graph there: the per-task backward passes
  stop at the copies (cheap), the Gram matrix of those gradients is summed over processes (divided by
  the squared number of processes: the Gram matrix of the global batch's mean loss), the balancer's
  coefficients are computed, and one backward pass from the total and from the representation (seeded
  with ``sum_t c_t dL_t/dz`` plus the extra terms' part) gives every parameter its gradient. Needs
  ``train.accumulate: 1`` (the coefficients must be known before that backward pass).

Steps whose per-task gradients are not finite (an fp16 overflow, a diverging run) are not combined and
leave the balancer's state unchanged; the shared gradients then hold the non-finite sum, and the
combination is written before the loss scaler unscales, so the trainer's guard sees either case (a
non-finite sum or combination): with fp16 the scaler skips the step and lowers its scale, otherwise
training stops before the optimiser step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
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


def _replace(value: Any, swap: Callable[[Tensor], Tensor]) -> Any:
    """``value`` with every tensor in it (nested tuples, lists and dicts) replaced by ``swap(tensor)``."""
    if torch.is_tensor(value):
        return swap(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_replace(item, swap) for item in value)
    if isinstance(value, dict):
        return {key: _replace(item, swap) for key, item in value.items()}
    return value


class RepresentationCut:
    """Cuts a model's graph at its shared representation during training forward passes (module
    docstring): the outermost task-specific modules get detached copies of their shared inputs."""

    def __init__(self, model: nn.Module, task_names: list[str]) -> None:
        tasks = set(task_names)
        owned = [name for name, _ in model.named_modules() if name.split(".")[-1] in tasks]
        outermost = [name for name in owned if not any(name.startswith(other + ".") for other in owned)]
        if not outermost:
            raise ConfigError("loss.balancer_args.gradients: representation needs task-specific modules named by "
                              "task (e.g. heads.<task>); this model has none")
        self.cuts: dict[int, tuple[Tensor, Tensor]] = {}  # id(shared tensor) -> (it, its detached copy)
        self.produced: set[int] = set()
        for name in outermost:
            module = model.get_submodule(name)
            module.register_forward_pre_hook(self._cut_inputs)
            module.register_forward_hook(self._record_outputs)

    def _cut_inputs(self, module: nn.Module, args: tuple) -> tuple | None:
        if not (module.training and torch.is_grad_enabled()):
            return None
        return _replace(args, self._copy)

    def _copy(self, tensor: Tensor) -> Tensor:
        if not tensor.requires_grad or id(tensor) in self.produced:
            return tensor
        if id(tensor) not in self.cuts:
            self.cuts[id(tensor)] = (tensor, tensor.detach().requires_grad_())
        return self.cuts[id(tensor)][1]

    def _record_outputs(self, module: nn.Module, args: tuple, output: Any) -> None:
        if module.training and torch.is_grad_enabled():
            self.produced.update(id(tensor) for tensor in _tensors(output))

    def take(self) -> tuple[list[Tensor], list[Tensor]]:
        """The representation of the last forward pass and the copies the task modules got (forgotten here)."""
        pairs = list(self.cuts.values())
        self.cuts, self.produced = {}, set()
        if not pairs:
            raise RuntimeError("no shared representation was recorded in the forward pass")
        return [shared for shared, _ in pairs], [copy for _, copy in pairs]


def _flat(grads: tuple[Tensor | None, ...], like: list[Tensor]) -> Tensor:
    """One float32 vector of gradients (zeros where a tensor got none)."""
    pairs = zip(grads, like, strict=True)
    parts = [(g if g is not None else torch.zeros_like(t)).reshape(-1).float() for g, t in pairs]
    return torch.cat(parts)


def _grads(value: Tensor | None, inputs: list[Tensor], scaler: torch.amp.GradScaler) -> tuple[Tensor | None, ...]:
    """``d scaled(value) / d inputs``, keeping the graph (Nones when ``value`` carries no gradient)."""
    if value is None or not value.requires_grad or not inputs:
        return (None,) * len(inputs)
    return torch.autograd.grad(scaler.scale(value), inputs, retain_graph=True, allow_unused=True)


class TaskGradients:
    """The per-task gradient path of one training phase (see the module docstring)."""

    def __init__(self, model: nn.Module, objective: nn.Module, trainable: list[nn.Parameter], accumulate: int) -> None:
        self.objective = objective
        self.balancer: GradientBalancer = objective.balancer
        task_names = self.balancer.task_names
        self.shared = shared_parameters_by_name(model, task_names, trainable)
        self.cut = None
        if self.balancer.gradients == "representation":
            if accumulate != 1:
                raise ConfigError("loss.balancer_args.gradients: representation needs train.accumulate 1 (the "
                                  "weights must be known before the backward pass)")
            self.cut = RepresentationCut(model, task_names)
        self.rows: Tensor | None = None  # parameters: the per-task rows, then the extra terms' (T + 1 x P)
        self.losses = torch.zeros(len(task_names))
        self.skipped = False

    def _extra_total(self, accumulate: int) -> Tensor | None:
        """The sum of the objective's extra terms that carry a gradient (None when there is none)."""
        extra = [term for term in self.objective.extra_terms if term.requires_grad]
        self.objective.extra_terms = []
        return torch.stack([term.reshape(()) for term in extra]).sum() / accumulate if extra else None

    def backward(self, total: Tensor, scaler: torch.amp.GradScaler, accumulate: int, step: int) -> None:
        """Back-propagate one micro-batch's ``total`` (already divided by ``accumulate``) and record the
        per-task gradients; replaces ``scaler.scale(total).backward()``."""
        terms = self.balancer.take_terms().to(total.device) / accumulate
        extra = self._extra_total(accumulate)
        self.losses = self.losses.to(terms.device) + terms.detach().float()
        if self.cut is not None:
            self._representation_backward(total, terms, extra, scaler, step)
            return
        rows = torch.stack([_flat(_grads(value, self.shared, scaler), self.shared) for value in [*terms, extra]])
        self.rows = rows if self.rows is None else self.rows + rows
        scaler.scale(total).backward()

    def _representation_backward(
        self, total: Tensor, terms: Tensor, extra: Tensor | None, scaler: torch.amp.GradScaler, step: int
    ) -> None:
        shared, copies = self.cut.take()
        per_task = [_grads(term, copies, scaler) for term in terms]
        gram = torch.zeros(len(terms), len(terms), dtype=torch.float64, device=total.device)
        for index, copy in enumerate(copies):
            rows = torch.stack([_flat((grads[index],), [copy]) for grads in per_task]).double()
            gram += rows @ rows.T
        scale = scaler.get_scale() if scaler.is_enabled() else 1.0
        world = torch.distributed.get_world_size() if distributed.is_active() else 1
        gram = distributed.all_reduce_sum(gram) / (scale**2 * world**2)
        losses = distributed.all_reduce_mean(self.losses)
        self.losses = torch.zeros_like(self.losses)
        self.skipped = not bool(torch.isfinite(gram).all())
        coefficients = [1.0] * len(terms) if self.skipped else self.balancer.combination(gram, losses, step).tolist()
        roots, seeds = [scaler.scale(total)], [torch.ones_like(total)]
        for index, (tensor, extra_grad) in enumerate(zip(shared, _grads(extra, copies, scaler), strict=True)):
            parts = [c * grads[index] for c, grads in zip(coefficients, per_task, strict=True)
                     if grads[index] is not None]
            parts += [extra_grad] if extra_grad is not None else []
            if parts:
                roots.append(tensor)
                seeds.append(torch.stack(parts).sum(0).to(tensor.dtype))
        torch.autograd.backward(roots, seeds)

    def finish(self, scaler: torch.amp.GradScaler, step: int) -> dict[str, float]:
        """After the last micro-batch, before ``scaler.unscale_``: combine and write the (loss-scaled) shared
        gradients; returns the figures to log (each task's factor in the shared update)."""
        if self.cut is None:
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
        rows = distributed.all_reduce_mean(rows)  # loss-scaled, like the gradients the scaler unscales next
        self.skipped = not bool(torch.isfinite(rows).all())
        if self.skipped:
            update = rows.sum(0)  # non-finite: the trainer's guard skips the step or stops
        else:
            scale = scaler.get_scale() if scaler.is_enabled() else 1.0
            update = (self.balancer.combine_gradients(rows[:-1] / scale, losses, step) + rows[-1] / scale) * scale
        offset = 0
        for param in self.shared:
            size = param.numel()
            if param.grad is not None:
                param.grad.copy_(update[offset : offset + size].view_as(param))
            offset += size


def build_task_gradients(
    model: nn.Module, objective: nn.Module, trainable: list[nn.Parameter], accumulate: int
) -> TaskGradients | None:
    """The per-task gradient path when the objective's balancer asks for it (else None)."""
    if not getattr(objective.balancer, "needs_task_gradients", False):
        return None
    return TaskGradients(model, objective, trainable, accumulate)
