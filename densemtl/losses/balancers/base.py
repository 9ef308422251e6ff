"""Task-loss balancing: how the per-task losses become the one scalar the engine back-propagates.

Every scheme is a :class:`Balancer` registered by name (``loss.balancer``) with its options in
``loss.balancer_args``. ``combine(losses, step, shared_parameters)`` returns ``(total, weights)``:
``total`` is exactly what the engine calls ``backward()`` on, ``weights`` the multiplier of each
task's term in it (floats, for logging).

Base weights. ``loss.weights`` (missing task = ``Task.default_weight``) put the task losses on
comparable scales (edge 50, normals 10, ...). Every scheme keeps them: the dynamic schemes work on
the base-weighted losses ``b_t * L_t``, so their multipliers adapt *on top of* the usual scaling
and a scheme that leaves its weights at 1 trains exactly like ``fixed``. The reported weight is the
overall factor in front of ``L_t`` (``b_t`` times the dynamic multiplier) except for ``lps`` with
the log projection, where it is the multiplier of the projected term.

State (loss history, current weights, learnable weights) lives in buffers and parameters, so a
checkpoint's ``state_dict`` resumes a run exactly. Learnable parameters (``uncertainty``,
``gradnorm``) must go to the optimizer (without weight decay).
"""

from __future__ import annotations

import inspect
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from densemtl.errors import ConfigError

BALANCERS: dict[str, type[Balancer]] = {}


def _register(cls: type[Balancer]) -> type[Balancer]:
    BALANCERS[cls.name] = cls
    return cls


class Balancer(nn.Module):
    """Turns ``{task: loss}`` into the total to back-propagate; subclasses implement :meth:`combine`."""

    name: ClassVar[str]

    def __init__(self, task_names: list[str], base_weights: dict[str, float]) -> None:
        super().__init__()
        self.task_names = list(task_names)
        self.register_buffer("base", torch.tensor([base_weights[t] for t in self.task_names], dtype=torch.float32))

    def _stack(self, losses: dict[str, Tensor]) -> Tensor:
        missing = [t for t in self.task_names if t not in losses]
        if missing:
            raise ValueError(f"balancer '{self.name}': no loss for task(s) {', '.join(missing)}")
        return torch.stack([losses[t].float().reshape(()) for t in self.task_names])

    def _as_dict(self, weights: Tensor) -> dict[str, float]:
        return dict(zip(self.task_names, weights.detach().cpu().tolist(), strict=True))

    def combine(
        self, losses: dict[str, Tensor], step: int, shared_parameters: list[nn.Parameter] | None = None
    ) -> tuple[Tensor, dict[str, float]]:
        raise NotImplementedError


@_register
class FixedBalancer(Balancer):
    """Constant weights: ``loss.weights`` or each task's default."""

    name = "fixed"

    def combine(
        self, losses: dict[str, Tensor], step: int, shared_parameters: list[nn.Parameter] | None = None
    ) -> tuple[Tensor, dict[str, float]]:
        stacked = self._stack(losses)
        base = self.base.to(stacked.device)
        return (base * stacked).sum(), self._as_dict(base)


@_register
class UncertaintyBalancer(Balancer):
    """Kendall et al. (2018): learnable log-variances ``s_t``; ``sum exp(-s_t) b_t L_t + s_t``.

    This is the homoscedastic-uncertainty objective up to a factor 2 (``1/(2 sigma^2) L + log sigma``
    with ``s = log sigma^2``), chosen so the weights start at exactly the base weights.
    """

    name = "uncertainty"

    def __init__(self, task_names: list[str], base_weights: dict[str, float], *, init_log_var: float = 0.0) -> None:
        super().__init__(task_names, base_weights)
        self.log_vars = nn.Parameter(torch.full((len(self.task_names),), float(init_log_var)))

    def combine(
        self, losses: dict[str, Tensor], step: int, shared_parameters: list[nn.Parameter] | None = None
    ) -> tuple[Tensor, dict[str, float]]:
        stacked = self._stack(losses)
        log_vars = self.log_vars.to(stacked.device)
        factor = torch.exp(-log_vars) * self.base.to(stacked.device)
        total = (factor * stacked).sum() + log_vars.sum()
        return total, self._as_dict(factor)


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
        self.register_buffer("window_count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("window_index", torch.zeros((), dtype=torch.long))
        self.register_buffer("history", torch.zeros(2, n, dtype=torch.float64))  # [previous, current] means
        self.register_buffer("completed", torch.zeros((), dtype=torch.long))  # windows closed so far

    def _projected(self, stacked: Tensor) -> Tensor:
        """The per-task terms the weights multiply (base-weighted losses by default)."""
        return self.base.to(stacked.device) * stacked

    def _new_weights(self) -> Tensor:
        raise NotImplementedError

    def _close_window(self) -> None:
        sums = torch.cat([self.window_sum, self.window_count.reshape(1)])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(sums)
        means = sums[:-1] / sums[-1].clamp_min(1.0)
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
            if float(self.window_count) > 0:
                self._close_window()
            self.window_index.fill_(index)
        self.window_sum += terms.detach().to(self.window_sum)
        self.window_count += 1
        weights = self.weights.to(terms.device)
        return (weights * terms).sum(), self._reported(weights)

    def _reported(self, weights: Tensor) -> dict[str, float]:
        return self._as_dict(weights * self.base.to(weights.device))


@_register
class DWABalancer(WindowedBalancer):
    """Dynamic weight average (Liu et al., 2019): ``w = T softmax(r / temperature)``,
    ``r_t = L_t(previous window) / L_t(the window before)``; ones until two windows are done."""

    name = "dwa"

    def __init__(
        self, task_names: list[str], base_weights: dict[str, float], *, temperature: float = 2.0, window: int = 50
    ) -> None:
        super().__init__(task_names, base_weights, window)
        if temperature <= 0:
            raise ConfigError(f"loss.balancer_args.temperature: must be positive, got {temperature}")
        self.temperature = temperature

    def _new_weights(self) -> Tensor:
        if int(self.completed) < 2:
            return torch.ones_like(self.weights)
        ratio = self.history[1] / self.history[0].clamp_min(1e-12)
        return len(self.task_names) * torch.softmax(ratio / self.temperature, dim=0)


@_register
class LPSBalancer(WindowedBalancer):
    """MT-CP loss prioritization: tasks whose loss falls slower than the total get more weight.

    Losses are first projected to a common scale: with ``projection: log`` each task's term is
    ``p_t = log(1 + b_t L_t)`` (positive, compresses the spread of loss magnitudes; its gradient is
    ``b_t grad L_t / (1 + b_t L_t)``), with ``none`` it is ``b_t L_t``. The total back-propagated is
    ``sum w_t p_t``. Per window, with ``P`` the window means of ``p`` and ``P_tot = sum P``:
    first window ``w_t = P_tot / P_t``; afterwards ``w_t = (P_t^e / P_t^{e-1}) / (P_tot^e / P_tot^{e-1})``.
    Then ``w <- mean(w) + spread (w - mean(w))``, clipped to at least ``min_weight * mean(w)`` and
    normalised to sum to the number of tasks. Weights are 1 during the first window; ``spread: 0`` keeps
    them at 1 throughout (the log projection alone, an ablation of the prioritization).
    """

    name = "lps"

    def __init__(
        self,
        task_names: list[str],
        base_weights: dict[str, float],
        *,
        spread: float = 1.6,
        window: int = 50,
        projection: str = "log",
        min_weight: float = 0.05,
    ) -> None:
        super().__init__(task_names, base_weights, window)
        if projection not in ("log", "none"):
            raise ConfigError(f"loss.balancer_args.projection: expected log or none, got {projection!r}")
        if spread < 0 or not 0 < min_weight < 1:
            raise ConfigError(
                f"loss.balancer_args: spread must be >= 0 and min_weight in (0, 1), got {spread}, {min_weight}"
            )
        self.spread = spread
        self.projection = projection
        self.min_weight = min_weight

    def _projected(self, stacked: Tensor) -> Tensor:
        scaled = self.base.to(stacked.device) * stacked
        return torch.log1p(scaled) if self.projection == "log" else scaled

    def _new_weights(self) -> Tensor:
        current = self.history[1].clamp_min(1e-12)
        if int(self.completed) == 1:
            raw = current.sum() / current
        else:
            previous = self.history[0].clamp_min(1e-12)
            raw = (current / previous) / (current.sum() / previous.sum())
        return lps_spread(raw, self.spread, self.min_weight)

    def _reported(self, weights: Tensor) -> dict[str, float]:
        return self._as_dict(weights if self.projection == "log" else weights * self.base.to(weights.device))


def lps_spread(raw: Tensor, spread: float, min_weight: float) -> Tensor:
    """Spread weights around their mean by ``spread``, keep them positive, make them sum to their count."""
    mean = raw.mean()
    spread_out = (mean + spread * (raw - mean)).clamp_min(min_weight * mean)
    return spread_out * (len(raw) / spread_out.sum())


@_register
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
        with torch.no_grad():
            self.task_weights.clamp_(min=1e-3)
            self.task_weights.mul_(len(self.task_names) / self.task_weights.sum())
            if not bool(self.started):
                self.initial_losses.copy_(terms.detach())
                self.started.fill_(True)
        norms = []
        for term in terms:
            grads = torch.autograd.grad(term, shared_parameters, retain_graph=True, allow_unused=True)
            squares = [g.detach().pow(2).sum() for g in grads if g is not None]
            norms.append(torch.stack(squares).sum().sqrt() if squares else terms.new_zeros(()))
        weights = self.task_weights.to(stacked.device)
        grad_norms = weights * torch.stack(norms)
        with torch.no_grad():
            ratio = terms.detach() / self.initial_losses.to(terms.device).clamp_min(1e-12)
            target = grad_norms.mean() * (ratio / ratio.mean().clamp_min(1e-12)) ** self.alpha
        grad_loss = (grad_norms - target).abs().sum()
        total = (weights.detach() * terms).sum() + grad_loss
        return total, self._as_dict(weights.detach() * self.base.to(weights.device))


def _base_weights(loss_config: Any, task_names: list[str]) -> dict[str, float]:
    from densemtl.tasks import TASKS

    unknown = [name for name in loss_config.weights if name not in task_names]
    if unknown:
        raise ConfigError(f"loss.weights: {', '.join(unknown)} not among the trained tasks ({', '.join(task_names)})")
    weights = {}
    for name in task_names:
        if name in loss_config.weights:
            weights[name] = float(loss_config.weights[name])
        elif name in TASKS:
            weights[name] = float(TASKS[name].default_weight)
        else:
            weights[name] = 1.0
        if weights[name] < 0:
            raise ConfigError(f"loss.weights.{name}: must be non-negative, got {weights[name]}")
    return weights


def _balancer_kwargs(cls: type[Balancer], args: dict[str, Any], steps_per_epoch: int | None) -> dict[str, Any]:
    """Check ``loss.balancer_args`` against the scheme's keyword options and convert their types."""
    options = {
        name: param.default
        for name, param in inspect.signature(cls.__init__).parameters.items()
        if param.kind is inspect.Parameter.KEYWORD_ONLY
    }
    kwargs: dict[str, Any] = {}
    for key, value in args.items():
        if key not in options:
            known = ", ".join(options) or "none"
            raise ConfigError(f"loss.balancer_args.{key}: unknown option for '{cls.name}' (known: {known})")
        default = options[key]
        try:
            if isinstance(default, bool) or isinstance(value, bool):
                raise TypeError
            kwargs[key] = type(default)(value) if not isinstance(default, str) else str(value)
        except (TypeError, ValueError):
            raise ConfigError(f"loss.balancer_args.{key}: expected a {type(default).__name__}, got {value!r}") from None
        if isinstance(default, int) and kwargs[key] != value:
            raise ConfigError(f"loss.balancer_args.{key}: expected an integer, got {value!r}")
    if "window" in options and "window" not in kwargs and steps_per_epoch:
        kwargs["window"] = int(steps_per_epoch)
    return kwargs


def build_balancer(loss_config: Any, task_names: list[str], steps_per_epoch: int | None = None) -> Balancer:
    """The balancer named by ``loss.balancer``, with base weights from ``loss.weights``.

    ``steps_per_epoch`` (optional, from the engine) is the default window of the windowed schemes
    (``dwa``, ``lps``) when ``loss.balancer_args.window`` is not set; otherwise 50 steps.
    """
    name = loss_config.balancer
    if name not in BALANCERS:
        raise ConfigError(f"loss.balancer: unknown balancer '{name}' (known: {', '.join(sorted(BALANCERS))})")
    if not task_names:
        raise ConfigError("loss.balancer: no tasks to balance")
    cls = BALANCERS[name]
    kwargs = _balancer_kwargs(cls, dict(loss_config.balancer_args), steps_per_epoch)
    return cls(list(task_names), _base_weights(loss_config, list(task_names)), **kwargs)
