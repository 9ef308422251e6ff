"""The two baselines: a shared-encoder multi-task model and independent single-task models.

Both follow the model contract of docs/architecture.md: ``feature_channels``, ``tasks`` and
``forward(image) -> {"pred": {task: raw}, "features": {task: decoder feature}}``; they are the
``multitask`` and ``single`` rows of :data:`densemtl.registry.ARCHITECTURES` (one training phase, deployed
as trained).
Submodules specific to a task are named by the task (``heads.<task>``, ``networks.<task>``), which
is how :mod:`densemtl.engine.bench` attributes parameters and FLOPs to tasks.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from densemtl.models.architecture import Architecture
from densemtl.models.backbones import build_backbone
from densemtl.models.decoders import FPNNeck, TaskHead
from densemtl.models.output import ModelOutput

if TYPE_CHECKING:
    from densemtl.config import Config, ModelConfig
    from densemtl.dataset_info import DatasetInfo
    from densemtl.tasks import Task


class MultiTaskModel(nn.Module):
    """One backbone and one FPN neck shared by all tasks; one light head per task."""

    def __init__(self, model_config: ModelConfig, tasks: dict[str, Task]) -> None:
        super().__init__()
        self.tasks = dict(tasks)
        self.backbone = build_backbone(model_config)
        self.neck = FPNNeck(self.backbone.channels, model_config.neck_channels)
        self.heads = nn.ModuleDict(
            {
                name: TaskHead(model_config.neck_channels, model_config.head_channels, task.channels)
                for name, task in tasks.items()
            }
        )
        self.feature_channels = {name: model_config.head_channels for name in tasks}

    def forward(self, image: torch.Tensor) -> ModelOutput:
        size = (image.shape[-2], image.shape[-1])
        shared = self.neck(self.backbone(image))
        # the shared map covers the image padded to a multiple of 32: crop features to the image's extent
        stride = self.backbone.strides[0]
        crop_h, crop_w = math.ceil(size[0] / stride), math.ceil(size[1] / stride)
        pred, features = {}, {}
        for name, head in self.heads.items():
            pred[name], feature = head(shared, size)
            features[name] = feature[..., :crop_h, :crop_w]
        return {"pred": pred, "features": features}


class SingleTaskModels(nn.Module):
    """One complete network per task (nothing shared): the single-task baselines, trainable together."""

    def __init__(self, model_config: ModelConfig, tasks: dict[str, Task]) -> None:
        super().__init__()
        self.tasks = dict(tasks)
        self.networks = nn.ModuleDict(
            {name: MultiTaskModel(model_config, {name: task}) for name, task in tasks.items()}
        )
        self.feature_channels = {name: model_config.head_channels for name in tasks}

    def forward(self, image: torch.Tensor) -> ModelOutput:
        pred, features = {}, {}
        for name, network in self.networks.items():
            out = network(image)
            pred[name], features[name] = out["pred"][name], out["features"][name]
        return {"pred": pred, "features": features}


def build_multitask(config: Config, info: DatasetInfo, tasks: dict[str, Task]) -> MultiTaskModel:
    return MultiTaskModel(config.model, tasks)


def build_single(config: Config, info: DatasetInfo, tasks: dict[str, Task]) -> SingleTaskModels:
    return SingleTaskModels(config.model, tasks)


MULTITASK = Architecture(build=build_multitask)
SINGLE = Architecture(build=build_single)
