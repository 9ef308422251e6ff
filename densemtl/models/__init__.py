"""Networks: backbones, decoders, the baselines and the three methods' architectures."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from densemtl.registry import ARCHITECTURES

if TYPE_CHECKING:
    from densemtl.config import Config
    from densemtl.dataset_info import DatasetInfo
    from densemtl.tasks import Task


def build_model(config: Config, info: DatasetInfo, tasks: dict[str, Task]) -> nn.Module:
    """The network of ``config.model.arch`` (:data:`densemtl.registry.ARCHITECTURES`; an unknown name is
    a ConfigError listing the known ones). Only the chosen architecture's module is imported."""
    return ARCHITECTURES.lookup(config.model.arch).build(config, info, tasks)
