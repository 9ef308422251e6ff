"""MT-CP: per-task decoders, cross-task fusion (CFM) and the trace-back refinement chain (SRM).

Data flow (C = ``model.head_channels``, stage sizes are the backbone strides 32/16/8/4):

1. The shared backbone gives four levels; shared 1x1 laterals map them to ``model.neck_channels``.
2. Per task, a top-down decoder (coarse to fine) gives stage features ``D_t^32 .. D_t^4`` (C channels),
   fused FPN-style (all stages upsampled to 1/4 and summed, then a 3x3 conv) into ``X_t`` at 1/4.
3. :class:`CrossTaskFusion` per task turns ``X_t`` (and the other tasks' ``X``) into ``F_t``.
4. :class:`TraceBack` per task walks the decoder stages from the coarsest to the finest, refining the
   prediction features ``P`` (kept at 1/4, starting from ``F_t``) and the stage features; each step has
   an intermediate head (deep supervision, loss weight ``mtcp.traceback_weight`` in the objective).
5. A final head per task gives the raw output at the input size; ``features`` is the final ``P``.

The cosine consistency term (``mtcp.consistency_weight`` > 0) aligns the fused representations of
every pair of tasks after a per-task 1x1 projection into a common space; the projections exist only
when the term is enabled. Task-specific modules are keyed by task name (``decoders.<task>``,
``fusion.<task>``, ``traceback.<task>``, ``heads.<task>``) so the benchmark can attribute cost to tasks.
"""

from __future__ import annotations

import math
from itertools import combinations
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from densemtl.models.architecture import Architecture
from densemtl.models.backbones import build_backbone
from densemtl.models.decoders import conv_bn_relu, resize_to_input
from densemtl.models.output import ModelOutput

if TYPE_CHECKING:
    from densemtl.config import Config
    from densemtl.dataset_info import DatasetInfo
    from densemtl.tasks import Task


def _resize(x: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class TaskDecoder(nn.Module):
    """Shared levels (finest first) -> this task's stage features (coarsest first) and ``X_t`` at 1/4."""

    def __init__(self, in_channels: int, channels: int, levels: int) -> None:
        super().__init__()
        self.enter = nn.ModuleList(conv_bn_relu(in_channels, channels, 1) for _ in range(levels))
        self.stages = nn.ModuleList(conv_bn_relu(channels, channels) for _ in range(levels))
        self.fuse = conv_bn_relu(channels, channels)

    def forward(self, levels: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        stages: list[torch.Tensor] = []
        previous = None
        for enter, stage, level in zip(self.enter, self.stages, reversed(levels), strict=True):
            x = enter(level)
            if previous is not None:
                x = x + _resize(previous, x.shape[-2:])
            previous = stage(x)
            stages.append(previous)
        size = stages[-1].shape[-2:]
        fused = sum(_resize(s, size) for s in stages)
        return stages, self.fuse(fused)


class ChannelSpatialAttention(nn.Module):
    """Squeeze-excitation over channels, then a 7x7 gate over positions from channel mean and max."""

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        hidden = max(channels // reduction, 4)
        self.channel = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(channels, hidden, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, 1),
        )
        self.spatial = nn.Conv2d(2, 1, 7, padding=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * torch.sigmoid(self.channel(x))
        pooled = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.spatial(pooled))


class CrossTaskFusion(nn.Module):
    """CFM for one task: ``F_t = main + gamma W(A g(main)) + aux`` (``gamma`` learnable, starts at 0).

    ``main`` is ``X_t`` after channel and spatial attention; ``aux`` merges the other tasks' ``X_s``,
    each gated elementwise by ``sigmoid(1x1 conv(X_s))``. ``A = softmax(theta(main)^T phi(aux) / sqrt(d))``
    is attention over positions: queries from this task, keys from the other tasks (where they see
    similar structure), values from this task, so cross-task affinities route this task's features.

    Memory: full attention needs (h w)^2 scores (19200^2 at 1/4 of 480x640). With ``attention_size``
    set (the default), keys and values are average-pooled to a grid of at most that many cells per
    side, keeping the aspect ratio; queries stay at full resolution, so the output keeps its
    resolution but each position attends to region averages instead of single positions (detail
    finer than one cell is not matched). ``None`` attends over all positions.
    """

    def __init__(self, channels: int, num_others: int, attention_size: int | None) -> None:
        super().__init__()
        inner = max(channels // 2, 8)
        self.attention_size = attention_size
        self.main = ChannelSpatialAttention(channels)
        self.gates = nn.ModuleList(nn.Conv2d(channels, channels, 1) for _ in range(num_others))
        self.merge = conv_bn_relu(channels, channels, 1) if num_others else None
        self.theta = nn.Conv2d(channels, inner, 1)
        self.phi = nn.Conv2d(channels, inner, 1)
        self.value = nn.Conv2d(channels, inner, 1)
        self.out = nn.Conv2d(inner, channels, 1)
        # a learnable scale from zero (as in DANet) instead of a BatchNorm: the attention output is
        # nearly constant over positions, so a BatchNorm's running variance collapses (~1e-3) and
        # amplifies any train/eval difference by orders of magnitude at evaluation
        self.gamma = nn.Parameter(torch.zeros(1))

    def key_grid(self, height: int, width: int) -> tuple[int, int]:
        """The grid the keys and values are pooled to for a ``height`` x ``width`` map."""
        factor = 1 if self.attention_size is None else math.ceil(max(height, width) / self.attention_size)
        if factor <= 1:
            return height, width
        return math.ceil(height / factor), math.ceil(width / factor)

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        grid = self.key_grid(*x.shape[-2:])
        return x if grid == tuple(x.shape[-2:]) else F.adaptive_avg_pool2d(x, grid)

    def forward(self, own: torch.Tensor, others: list[torch.Tensor]) -> torch.Tensor:
        main = self.main(own)
        aux = None
        if self.merge is not None:
            aux = self.merge(sum(torch.sigmoid(gate(x)) * x for gate, x in zip(self.gates, others, strict=True)))
        b, _, h, w = main.shape
        query = self.theta(main).flatten(2).transpose(1, 2)[:, None]
        key = self.phi(self._pool(aux if aux is not None else main)).flatten(2).transpose(1, 2)[:, None]
        value = self.value(self._pool(main)).flatten(2).transpose(1, 2)[:, None]
        attended = F.scaled_dot_product_attention(query, key, value)[:, 0]
        attended = self.gamma * self.out(attended.transpose(1, 2).reshape(b, -1, h, w))
        fused = main + attended
        return fused + aux if aux is not None else fused


class RefineStep(nn.Module):
    """One SRM step: (prediction features P at 1/4, stage features S) -> (refined P, refined S, P_stage)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.mix = conv_bn_relu(2 * channels, channels)
        self.to_prediction = conv_bn_relu(channels, channels)
        self.to_stage = conv_bn_relu(channels, channels)

    def forward(self, prediction: torch.Tensor, stage: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mixed = self.mix(torch.cat([_resize(prediction, stage.shape[-2:]), stage], dim=1))
        refined_prediction = prediction + _resize(self.to_prediction(mixed), prediction.shape[-2:])
        return refined_prediction, stage + self.to_stage(mixed)


class TraceBack(nn.Module):
    """The SRM chain over the decoder stages, coarsest first, with one intermediate head per step.

    Step k takes the stage feature ``D^k`` plus the refined stage feature of step k-1 (upsampled), and
    the current prediction features; it adds a refinement to the prediction features (kept at 1/4)
    and hands its refined stage feature down the chain. The last step's prediction features feed the
    final head.
    """

    def __init__(self, channels: int, out_channels: int, levels: int) -> None:
        super().__init__()
        self.steps = nn.ModuleList(RefineStep(channels) for _ in range(levels))
        self.heads = nn.ModuleList(nn.Conv2d(channels, out_channels, 1) for _ in range(levels))

    def forward(self, prediction: torch.Tensor, stages: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        intermediate = []
        passed = None
        for step, head, stage in zip(self.steps, self.heads, stages, strict=True):
            if passed is not None:
                stage = stage + _resize(passed, stage.shape[-2:])
            prediction, passed = step(prediction, stage)
            intermediate.append(head(prediction))
        return prediction, intermediate


class FinalHead(nn.Module):
    def __init__(self, channels: int, out_channels: int) -> None:
        super().__init__()
        self.body = conv_bn_relu(channels, channels)
        self.classifier = nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return resize_to_input(self.classifier(self.body(x)), size)


def cosine_consistency(embeddings: list[torch.Tensor]) -> torch.Tensor:
    """Mean over task pairs and positions of ``1 - cos`` between the tasks' embeddings."""
    pairs = [1 - F.cosine_similarity(a, b, dim=1).mean() for a, b in combinations(embeddings, 2)]
    return torch.stack(pairs).mean()


class MTCPModel(nn.Module):
    """Shared backbone, per-task decoders, CFM, trace-back and final heads (module docstring)."""

    def __init__(self, config: Config, tasks: dict[str, Task]) -> None:
        super().__init__()
        self.tasks = dict(tasks)
        model_config, mtcp = config.model, config.mtcp
        channels = model_config.head_channels
        self.backbone = build_backbone(model_config)
        levels = len(self.backbone.channels)
        self.laterals = nn.ModuleList(nn.Conv2d(c, model_config.neck_channels, 1) for c in self.backbone.channels)
        names = list(tasks)
        self.decoders = nn.ModuleDict({t: TaskDecoder(model_config.neck_channels, channels, levels) for t in names})
        self.fusion = nn.ModuleDict({t: CrossTaskFusion(channels, len(names) - 1, mtcp.attention_size) for t in names})
        self.traceback = nn.ModuleDict({t: TraceBack(channels, task.channels, levels) for t, task in tasks.items()})
        self.heads = nn.ModuleDict({t: FinalHead(channels, task.channels) for t, task in tasks.items()})
        self.consistency_weight = mtcp.consistency_weight
        self.projectors = None
        if mtcp.consistency_weight > 0 and len(names) > 1:
            self.projectors = nn.ModuleDict({t: nn.Conv2d(channels, channels, 1) for t in names})
        self.feature_channels = {t: channels for t in names}

    def forward(self, image: torch.Tensor) -> ModelOutput:
        height, width = image.shape[-2:]
        levels = [lateral(x) for lateral, x in zip(self.laterals, self.backbone(image), strict=True)]
        decoded = {t: decoder(levels) for t, decoder in self.decoders.items()}
        fused = {
            t: fusion(decoded[t][1], [decoded[s][1] for s in self.decoders if s != t])
            for t, fusion in self.fusion.items()
        }
        # maps at 1/4 cover the image padded to a multiple of 32: crop them to the image's own extent
        crop_h, crop_w = math.ceil(height / 4), math.ceil(width / 4)
        pred, features, intermediate = {}, {}, {}
        for t in self.decoders:
            final, steps = self.traceback[t](fused[t], decoded[t][0])
            features[t] = final[..., :crop_h, :crop_w]
            intermediate[t] = [raw[..., :crop_h, :crop_w] for raw in steps]
            pred[t] = self.heads[t](final, (height, width))
        output: ModelOutput = {"pred": pred, "features": features, "intermediate": intermediate}
        extra = {}
        if self.projectors is not None:
            embeddings = [self.projectors[t](fused[t]) for t in self.projectors]
            extra["consistency"] = self.consistency_weight * cosine_consistency(embeddings)
        output["extra_losses"] = extra
        return output


def build_mtcp(config: Config, info: DatasetInfo, tasks: dict[str, Task]) -> MTCPModel:
    """The MT-CP network for ``tasks`` (``info`` is accepted for the common model-builder signature)."""
    return MTCPModel(config, tasks)


MTCP = Architecture(build=build_mtcp)  # one training phase, deployed as trained
