"""What ``model.arch`` names: how to build a network, how to train it (a list of phases) and how it is
deployed. Each architecture module defines one :class:`Architecture` and has a row in
:data:`densemtl.registry.ARCHITECTURES`; the engine only ever talks to this interface, so a new
architecture (even one trained in several phases, or deployed as something other than the trained
network) is one new file plus one row.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from torch import nn

from densemtl.models.output import ModelOutput

if TYPE_CHECKING:
    import torch

    from densemtl.config import Config
    from densemtl.dataset_info import DatasetInfo
    from densemtl.tasks import Task

ModelBuilder = Callable[["Config", "DatasetInfo", "dict[str, Task]"], nn.Module]
LossHook = Callable[[nn.Module, ModelOutput, "dict[str, Any]"], "dict[str, torch.Tensor]"]


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters that require gradients (what a phase trains unless it says otherwise)."""
    return [param for param in model.parameters() if param.requires_grad]


def _leave_as_is(model: nn.Module) -> None:
    """A phase that needs no change to the model (the only phase of an ordinary architecture)."""


@dataclass(frozen=True)
class Phase:
    """One stage of training: ``steps`` optimiser steps on the losses of ``tasks``.

    ``enter(model)`` puts the model in this phase (which parameters require gradients, what is frozen);
    it runs before the phase, even one of 0 steps, so later phases start from the right state.
    ``parameters(model)`` (called after ``enter``) are what the optimiser updates. ``loss_hook(model,
    output, batch)`` returns extra named loss terms (e.g. one that needs a batch entry beyond the image).
    ``clip_groups(model)``, when set, splits the parameters into groups whose gradients are clipped apart
    (``train.grad_clip`` each), e.g. tasks trained jointly that must not shrink each other's steps.
    """

    name: str
    steps: int
    tasks: tuple[str, ...]
    enter: Callable[[nn.Module], None] = _leave_as_is
    parameters: Callable[[nn.Module], list[nn.Parameter]] = trainable_parameters
    loss_hook: LossHook | None = None
    clip_groups: Callable[[nn.Module], list[list[nn.Parameter]]] | None = None


def one_phase(config: Config, model: nn.Module) -> list[Phase]:
    """The training of an ordinary architecture: every task, ``train.steps`` steps, one run directory."""
    return [Phase("train", config.train.steps, tuple(model.tasks))]


@dataclass(frozen=True)
class Architecture:
    """A network family: ``build(config, info, tasks)``, ``phases(config, model)``, ``deploy`` and ``export``.

    ``deploy(model, config)`` turns a trained network into what evaluation and video prediction run
    (None: the network itself). ``export(model, config)`` gives the form traced into a static graph (ONNX):
    one whose forward has no branch on tensor values (None: the network itself). Whatever either returns
    is called like a model and gives at least ``{"pred": ...}``.
    """

    build: ModelBuilder
    phases: Callable[[Config, nn.Module], list[Phase]] = one_phase
    deploy: Callable[[nn.Module, Config], nn.Module] | None = None
    export: Callable[[nn.Module, Config], nn.Module] | None = None

    def deployed(self, model: nn.Module, config: Config) -> nn.Module:
        """The form of ``model`` that is evaluated and used (the model itself unless ``deploy`` is set)."""
        return model if self.deploy is None else self.deploy(model, config)

    def exported(self, model: nn.Module, config: Config) -> nn.Module:
        """The form of ``model`` that ONNX export traces (the model itself unless ``export`` is set)."""
        return model if self.export is None else self.export(model, config)


@dataclass(frozen=True)
class DeploymentCost:
    """What a deployed form's inference cost so far: ``figures`` go to evaluation records under ``key``,
    ``summary`` is one line for the console, ``gflops_per_image`` (when counted) is what bench and result
    files report for it."""

    key: str
    figures: dict[str, Any]
    summary: str
    gflops_per_image: float | None = None


@runtime_checkable
class ReportsCost(Protocol):
    """A deployed form that counts the cost of its own inference (evaluation reports it)."""

    def cost_report(self) -> DeploymentCost: ...
