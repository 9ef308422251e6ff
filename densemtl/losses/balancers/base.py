"""Task-loss balancing: how the per-task losses become the one scalar the engine back-propagates.

Every scheme is a :class:`Balancer` subclass in a module of its own, listed by name in
:data:`densemtl.registry.BALANCERS` (``loss.balancer``), with its options (the keyword-only arguments
of its ``__init__``) in ``loss.balancer_args``; a new scheme is one module plus one row there.
``combine(losses, step, shared_parameters)`` returns ``(total, weights)``: ``total`` is exactly what
the engine calls ``backward()`` on, ``weights`` the multiplier of each task's term in it (floats, for
logging).

Base weights. ``loss.weights`` (missing task = ``Task.default_weight``) put the task losses on
comparable scales (edge 50, normals 10, ...). Every scheme keeps them: the dynamic schemes work on
the base-weighted losses ``b_t * L_t``, so their multipliers adapt *on top of* the usual scaling
and a scheme that leaves its weights at 1 trains exactly like ``fixed``. The reported weight is the
overall factor in front of ``L_t`` (``b_t`` times the dynamic multiplier) except for ``lps`` with
the log projection, where it is the multiplier of the projected term.

Partial labels. ``losses`` holds the tasks that have a labelled sample in the batch (each loss is the
mean over those samples); a task left out counts as a loss of 0 in the total and is ignored by the
schemes' statistics (window means, uncertainty's regulariser, GradNorm's norms).

State (loss history, current weights, learnable weights) lives in buffers and parameters, so a
checkpoint's ``state_dict`` resumes a run exactly. Learnable parameters (``uncertainty``,
``gradnorm``) must go to the optimizer (without weight decay).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from densemtl.errors import ConfigError


class Balancer(nn.Module):
    """Turns ``{task: loss}`` into the total to back-propagate; subclasses implement :meth:`combine`."""

    name: ClassVar[str]
    # True for schemes that combine per-task gradients of the shared part (``gradient.GradientBalancer``):
    # the engine then back-propagates each task's term on its own (densemtl.engine.task_gradients)
    needs_task_gradients: ClassVar[bool] = False

    def __init__(self, task_names: list[str], base_weights: dict[str, float]) -> None:
        super().__init__()
        self.task_names = list(task_names)
        self.register_buffer("base", torch.tensor([base_weights[t] for t in self.task_names], dtype=torch.float32))

    def _stack(self, losses: dict[str, Tensor]) -> Tensor:
        """The losses in task order; a task not in ``losses`` (no label in the batch) is a constant 0."""
        unknown = [t for t in losses if t not in self.task_names]
        if unknown or not losses:
            raise ValueError(f"balancer '{self.name}': losses for {', '.join(unknown) or 'no task'}, "
                             f"expected some of {', '.join(self.task_names)}")
        like = next(iter(losses.values()))
        return torch.stack([losses[t].float().reshape(()) if t in losses else like.new_zeros((), dtype=torch.float32)
                            for t in self.task_names])

    def _present(self, losses: dict[str, Tensor], device: torch.device) -> Tensor:
        """Which tasks have a loss in this batch (bool, in task order)."""
        return torch.tensor([t in losses for t in self.task_names], device=device)

    def _as_dict(self, weights: Tensor) -> dict[str, float]:
        return dict(zip(self.task_names, weights.detach().cpu().tolist(), strict=True))

    def combine(
        self, losses: dict[str, Tensor], step: int, shared_parameters: list[nn.Parameter] | None = None
    ) -> tuple[Tensor, dict[str, float]]:
        raise NotImplementedError


class WindowedBalancer(Balancer):
    """Weights that change once per window of ``window`` steps, from the mean loss of past windows.

    The engine counts steps, not epochs, so a window stands in for the papers' epoch. Losses seen
    during the current window are accumulated (detached); when ``step`` enters a new window the means
    are pushed into a two-deep history and :meth:`_new_weights` recomputes the multipliers, which stay
    constant within the window. Under torch.distributed the window sums are all-reduced first so
    every rank uses the same weights.
    """

    def __init__(self, task_names: list[str], base_weights: dict[str, float], window: int) -> None:
        super().__init__(task_names, base_weights)
        if window < 1:
            raise ConfigError(f"loss.balancer_args.window: must be at least 1, got {window}")
        self.window = window
        n = len(self.task_names)
        self.register_buffer("weights", torch.ones(n))
        self.register_buffer("window_sum", torch.zeros(n, dtype=torch.float64))
        self.register_buffer("window_count", torch.zeros(n, dtype=torch.float64))  # steps each task had a loss
        self.register_buffer("window_index", torch.zeros((), dtype=torch.long))
        self.register_buffer("history", torch.zeros(2, n, dtype=torch.float64))  # [previous, current] means
        self.register_buffer("completed", torch.zeros((), dtype=torch.long))  # windows closed so far

    def _projected(self, stacked: Tensor) -> Tensor:
        """The per-task terms the weights multiply (base-weighted losses by default)."""
        return self.base.to(stacked.device) * stacked

    def _new_weights(self) -> Tensor:
        raise NotImplementedError

    def _close_window(self) -> None:
        sums = torch.cat([self.window_sum, self.window_count])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(sums)
        count = len(self.task_names)
        means = sums[:count] / sums[count:].clamp_min(1.0)
        self.history[0] = self.history[1]
        self.history[1] = means
        self.completed += 1
        self.weights.copy_(self._new_weights().to(self.weights.dtype))
        self.window_sum.zero_()
        self.window_count.zero_()

    def combine(
        self, losses: dict[str, Tensor], step: int, shared_parameters: list[nn.Parameter] | None = None
    ) -> tuple[Tensor, dict[str, float]]:
        terms = self._projected(self._stack(losses))
        index = step // self.window
        if index != int(self.window_index):
            if float(self.window_count.sum()) > 0:
                self._close_window()
            self.window_index.fill_(index)
        present = self._present(losses, terms.device)
        self.window_sum += (terms.detach() * present).to(self.window_sum)
        self.window_count += present.to(self.window_count)
        weights = self.weights.to(terms.device)
        return (weights * terms).sum(), self._reported(weights)

    def _reported(self, weights: Tensor) -> dict[str, float]:
        return self._as_dict(weights * self.base.to(weights.device))

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args) -> None:
        """Checkpoints written before partial labels counted the window's steps in one number."""
        count = state_dict.get(prefix + "window_count")
        if count is not None and count.dim() == 0:
            state_dict[prefix + "window_count"] = count.expand(len(self.task_names)).clone()
        super()._load_from_state_dict(state_dict, prefix, *args)
