"""Networks: backbones, decoders, the baselines and the three methods' architectures."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:
    from densemtl.config import Config
    from densemtl.dataset_info import DatasetInfo
    from densemtl.tasks import Task


def build_model(config: Config, info: DatasetInfo, tasks: dict[str, Task]) -> nn.Module:
    """The network for ``config.model.arch`` (the method modules are imported only when used)."""
    arch = config.model.arch
    if arch == "multitask":
        from densemtl.models.multitask import MultiTaskModel

        return MultiTaskModel(config.model, tasks)
    if arch == "single":
        from densemtl.models.multitask import SingleTaskModels

        return SingleTaskModels(config.model, tasks)
    if arch == "mtcp":
        from densemtl.models.mtcp import build_mtcp

        return build_mtcp(config, info, tasks)
    if arch == "sharing":
        from densemtl.models.sharing import build_sharing_model

        return build_sharing_model(config, info, tasks)
    from densemtl.errors import ConfigError

    raise ConfigError(f"model.arch: unknown architecture '{arch}' (known: multitask, single, mtcp, sharing)")
