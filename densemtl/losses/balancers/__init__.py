"""Loss balancers, one scheme per module; :func:`build_balancer` picks one by its name in the registry."""

from __future__ import annotations

import inspect
from typing import Any

from densemtl.config import LossConfig
from densemtl.errors import ConfigError
from densemtl.losses.balancers.base import Balancer
from densemtl.registry import BALANCERS, TASKS


def _base_weights(loss_config: LossConfig, task_names: list[str]) -> dict[str, float]:
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


def build_balancer(loss_config: LossConfig, task_names: list[str], steps_per_epoch: int | None = None) -> Balancer:
    """The balancer named by ``loss.balancer``, with base weights from ``loss.weights``.

    ``steps_per_epoch`` (optional, from the engine) is the default window of the windowed schemes
    (``dwa``, ``lps``) when ``loss.balancer_args.window`` is not set; otherwise 50 steps.
    """
    cls = BALANCERS.lookup(loss_config.balancer)
    if not task_names:
        raise ConfigError("loss.balancer: no tasks to balance")
    kwargs = _balancer_kwargs(cls, dict(loss_config.balancer_args), steps_per_epoch)
    return cls(list(task_names), _base_weights(loss_config, list(task_names)), **kwargs)
