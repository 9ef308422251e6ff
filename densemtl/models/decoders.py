"""Decoders over a backbone's multi-scale features: a shared FPN neck and light per-task heads.

The neck fuses the four backbone levels (strides 4-32) into one map at stride 4 (an FPN top-down
pathway, then each level upsampled to stride 4 and summed, as in semantic FPN). A task head turns
that map into the task's decoder feature (two 3x3 conv-BN-ReLU) and its raw output (a 1x1
classifier), upsampled to the input size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from densemtl.models.backbones import SIZE_DIVISOR


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int = 3) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def resize_to_input(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Upsample a map that covers the image padded to a multiple of 32, then crop to ``size``."""
    padded = tuple(math.ceil(s / SIZE_DIVISOR) * SIZE_DIVISOR for s in size)
    if tuple(x.shape[-2:]) != padded:
        x = F.interpolate(x, size=padded, mode="bilinear", align_corners=False)
    return x[..., : size[0], : size[1]]


class FPNNeck(nn.Module):
    """Multi-scale features (finest first) -> one fused map with ``channels`` channels at the finest stride."""

    def __init__(self, in_channels: list[int], channels: int) -> None:
        super().__init__()
        self.channels = channels
        self.lateral = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in in_channels)
        self.smooth = nn.ModuleList(conv_bn_relu(channels, channels) for _ in in_channels)

    def pyramid(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """The FPN levels, finest first, each with ``channels`` channels."""
        laterals = [conv(f) for conv, f in zip(self.lateral, features, strict=True)]
        for i in range(len(laterals) - 2, -1, -1):
            laterals[i] = laterals[i] + F.interpolate(
                laterals[i + 1], size=laterals[i].shape[-2:], mode="bilinear", align_corners=False
            )
        return [smooth(x) for smooth, x in zip(self.smooth, laterals, strict=True)]

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        levels = self.pyramid(features)
        size = levels[0].shape[-2:]
        fused = levels[0]
        for level in levels[1:]:
            fused = fused + F.interpolate(level, size=size, mode="bilinear", align_corners=False)
        return fused


class TaskHead(nn.Module):
    """Shared map -> (raw output at the input size, decoder feature before the 1x1 classifier)."""

    def __init__(self, in_channels: int, channels: int, out_channels: int) -> None:
        super().__init__()
        self.channels = channels
        self.body = nn.Sequential(conv_bn_relu(in_channels, channels), conv_bn_relu(channels, channels))
        self.classifier = nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        feature = self.body(x)
        return resize_to_input(self.classifier(feature), size), feature
