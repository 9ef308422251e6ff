"""MT-CP: per-task decoders, cross-task fusion (CFM) and the trace-back refinement chain (SRM).

Data flow (C = ``model.head_channels``, stage sizes are the backbone strides 32/16/8/4):

1. The shared backbone gives four levels; shared 1x1 laterals map them to ``model.neck_channels``.
2. Per task, a top-down decoder (coarse to fine) gives stage features ``D_t^32 .. D_t^4`` (C channels),
   fused FPN-style (all stages upsampled to 1/4 and summed, then a 3x3 conv) into ``X_t`` at 1/4.
3. The CFM per task (``mtcp.cfm``) turns ``X_t`` and the other tasks' ``X`` into ``F_t``:
   ``official`` (:class:`OfficialFusion`) is the layout of MT-CP's released code, generalised to any
   task count and width; ``bounded`` (:class:`BoundedFusion`) is densemtl's earlier residual layout.
4. The trace-back per task (``mtcp.traceback``) walks the decoder stages from coarse to fine:
   ``official`` (:class:`OfficialTraceBack`) as the released code, three steps over the three finest
   stages passing refined stage features down, intermediate heads on the first two;
   ``residual`` (:class:`ResidualTraceBack`) densemtl's earlier chain over every stage.
5. A final head per task gives the raw output at the input size; ``features`` is the trace-back's
   final map at 1/4. In training, ``intermediate`` holds the deep-supervision outputs upsampled to the
   input size (as the released code does); the objective weights them (``mtcp.traceback_weight``).

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

from densemtl.errors import ConfigError
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


def key_grid(height: int, width: int, attention_size: int | None) -> tuple[int, int]:
    """The grid that CFM keys and values are pooled to for a ``height`` x ``width`` map (aspect kept)."""
    factor = 1 if attention_size is None else math.ceil(max(height, width) / attention_size)
    if factor <= 1:
        return height, width
    return math.ceil(height / factor), math.ceil(width / factor)


def position_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_size: int | None, scale: float | None
) -> torch.Tensor:
    """``softmax(q^T k * scale) v`` over positions (B x C x H x W maps); keys and values are pooled to
    :func:`key_grid` first, queries keep the full resolution, so the output has ``value``'s channels at
    ``query``'s size. ``scale=None`` is ``1 / sqrt(d)``."""
    b, _, h, w = query.shape
    grid = key_grid(h, w, attention_size)

    def tokens(x: torch.Tensor, pool: bool) -> torch.Tensor:
        if pool and grid != (h, w):
            x = F.adaptive_avg_pool2d(x, grid)
        return x.flatten(2).transpose(1, 2)[:, None]

    out = F.scaled_dot_product_attention(tokens(query, False), tokens(key, True), tokens(value, True), scale=scale)
    return out[:, 0].transpose(1, 2).reshape(b, -1, h, w)


class CBAM(nn.Module):
    """Channel then spatial attention, as the released MT-CP code builds it (Woo et al., 2018).

    Channels: a shared MLP ``C -> C/16 -> C`` on the global average and the global max, summed,
    sigmoid. Positions: channel max and mean -> 7x7 conv (no bias) -> BatchNorm (momentum 0.01) ->
    sigmoid.
    """

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(channels // reduction, 1)
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, channels))
        self.spatial = nn.Sequential(nn.Conv2d(2, 1, 7, padding=3, bias=False), nn.BatchNorm2d(1, momentum=0.01))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.mlp(x.mean(dim=(2, 3))) + self.mlp(x.amax(dim=(2, 3)))
        x = x * torch.sigmoid(gate)[:, :, None, None]
        pooled = torch.cat([x.amax(dim=1, keepdim=True), x.mean(dim=1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.spatial(pooled))


def cbam_bn(channels: int, relu: bool = False) -> nn.Sequential:
    """CBAM then BatchNorm (then ReLU): the normalised attention blocks of the released CFM."""
    layers: list[nn.Module] = [CBAM(channels), nn.BatchNorm2d(channels)]
    return nn.Sequential(*layers, nn.ReLU(inplace=True)) if relu else nn.Sequential(*layers)


class OfficialFusion(nn.Module):
    """CFM as MT-CP's released code lays it out (``mtcp.cfm: official``), for any task count and width.

    Values: ``BN(CBAM(X_t))``, this task's own features. The other tasks' ``X_s`` are each gated by
    ``sigmoid(1x1 conv(X_s))``, concatenated and merged by a 1x1 conv to 2C channels + ReLU; two
    separate ``ReLU(BN(CBAM(.)))`` branches of that give queries and keys, so the affinities
    ``A = softmax(q^T k)`` (no 1/sqrt(d) scaling) come from the other tasks only. The output is
    ``BN(CBAM(A v))``, with no residual connection. With three tasks and C = 256 this is the released
    module exactly (two gates of 256, a 512 -> 512 merge). ``attention_size`` pools keys and values
    (None = full attention, as released).
    """

    def __init__(self, channels: int, num_others: int, attention_size: int | None) -> None:
        super().__init__()
        if num_others < 1:
            raise ConfigError("mtcp.cfm: 'official' takes its attention from the other tasks and needs at least "
                              "two tasks; use mtcp.cfm=bounded for one")
        self.attention_size = attention_size
        self.value = cbam_bn(channels)
        self.gates = nn.ModuleList(nn.Conv2d(channels, channels, 1) for _ in range(num_others))
        self.merge = nn.Sequential(nn.Conv2d(num_others * channels, 2 * channels, 1), nn.ReLU(inplace=True))
        self.query = cbam_bn(2 * channels, relu=True)
        self.key = cbam_bn(2 * channels, relu=True)
        self.out = cbam_bn(channels)

    def forward(self, own: torch.Tensor, others: list[torch.Tensor]) -> torch.Tensor:
        gated = [x * torch.sigmoid(gate(x)) for gate, x in zip(self.gates, others, strict=True)]
        merged = self.merge(torch.cat(gated, dim=1))
        attended = position_attention(
            self.query(merged), self.key(merged), self.value(own), self.attention_size, scale=1.0
        )
        return self.out(attended)


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


class BoundedFusion(nn.Module):
    """densemtl's earlier CFM (``mtcp.cfm: bounded``): ``F_t = main + gamma W(A g(main)) + aux``.

    ``main`` is ``X_t`` after channel and spatial attention; ``aux`` merges the other tasks' ``X_s``,
    each gated elementwise by ``sigmoid(1x1 conv(X_s))``. ``A = softmax(theta(main)^T phi(aux) / sqrt(d))``:
    queries from this task, keys from the other tasks, values from this task. ``gamma`` is learnable
    and starts at 0 (as in DANet) instead of a BatchNorm: the attention output is nearly constant over
    positions, so a BatchNorm's running variance collapses and amplifies any train/eval difference.
    Works with a single task (keys from ``main``). Meant for large maps with ``attention_size`` set.
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
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, own: torch.Tensor, others: list[torch.Tensor]) -> torch.Tensor:
        main = self.main(own)
        aux = None
        if self.merge is not None:
            aux = self.merge(sum(torch.sigmoid(gate(x)) * x for gate, x in zip(self.gates, others, strict=True)))
        keys = self.phi(aux if aux is not None else main)
        attended = position_attention(self.theta(main), keys, self.value(main), self.attention_size, scale=None)
        fused = main + self.gamma * self.out(attended)
        return fused + aux if aux is not None else fused


# mtcp.cfm -> the fusion module class
FUSIONS: dict[str, type[nn.Module]] = {"official": OfficialFusion, "bounded": BoundedFusion}


class RefineStep(nn.Module):
    """One SRM step of the released code: (passed features, stage features) -> (prediction, stage).

    Both inputs go through CBAM, the passed features are resized to the stage's size, the two are
    concatenated, and two 1x1 conv-BN-ReLU give the prediction features (C channels, at the stage's
    size) and the refined stage features handed to the next step (none after the last step).
    """

    def __init__(self, channels: int, pass_down: bool) -> None:
        super().__init__()
        self.passed_attention = CBAM(channels)
        self.stage_attention = CBAM(channels)
        self.to_prediction = conv_bn_relu(2 * channels, channels, 1)
        self.to_stage = conv_bn_relu(2 * channels, channels, 1) if pass_down else None

    def forward(self, passed: torch.Tensor, stage: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        mixed = torch.cat([_resize(self.passed_attention(passed), stage.shape[-2:]), self.stage_attention(stage)], 1)
        return self.to_prediction(mixed), self.to_stage(mixed) if self.to_stage is not None else None


def intermediate_head(channels: int, out_channels: int) -> nn.Sequential:
    """1x1 conv-BN-ReLU then a 1x1 classifier (the released code's heads are 1x1 stacks of this kind)."""
    return nn.Sequential(conv_bn_relu(channels, channels, 1), nn.Conv2d(channels, out_channels, 1))


class OfficialTraceBack(nn.Module):
    """The released trace-back (``mtcp.traceback: official``): three steps over the three finest stages.

    Step 0 takes the CFM output and the 1/16 stage, step 1 the refined stage of step 0 and the 1/8
    stage, step 2 that of step 1 and the 1/4 stage. Each step's prediction features are at its stage's
    size; the first two feed the intermediate ``heads``, the last is the final feature map (1/4).
    ``forward`` returns the final map and the intermediate heads' inputs.
    """

    steps_used = 3

    def __init__(self, channels: int, out_channels: int, levels: int) -> None:
        super().__init__()
        count = min(self.steps_used, levels)
        self.steps = nn.ModuleList(RefineStep(channels, pass_down=k < count - 1) for k in range(count))
        self.heads = nn.ModuleList(intermediate_head(channels, out_channels) for _ in range(count - 1))

    def forward(self, fused: torch.Tensor, stages: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        passed, predictions = fused, []
        for step, stage in zip(self.steps, stages[-len(self.steps):], strict=True):
            prediction, passed = step(passed, stage)
            predictions.append(prediction)
        return predictions[-1], predictions[:-1]


class ResidualRefineStep(nn.Module):
    """One step of densemtl's earlier chain: (P at 1/4, stage S) -> (P + refinement, S + refinement)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.mix = conv_bn_relu(2 * channels, channels)
        self.to_prediction = conv_bn_relu(channels, channels)
        self.to_stage = conv_bn_relu(channels, channels)

    def forward(self, prediction: torch.Tensor, stage: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mixed = self.mix(torch.cat([_resize(prediction, stage.shape[-2:]), stage], dim=1))
        refined_prediction = prediction + _resize(self.to_prediction(mixed), prediction.shape[-2:])
        return refined_prediction, stage + self.to_stage(mixed)


class ResidualTraceBack(nn.Module):
    """densemtl's earlier chain (``mtcp.traceback: residual``): one step per stage, coarsest first.

    Step k takes the stage feature ``D^k`` plus the refined stage feature of step k-1 (upsampled), and
    the current prediction features; it adds a refinement to the prediction features (kept at 1/4,
    starting from the CFM output) and hands its refined stage feature down. A 1x1 intermediate head
    on every step's prediction features; the last ones are the final feature map. ``forward`` returns
    the final map and the intermediate heads' inputs.
    """

    def __init__(self, channels: int, out_channels: int, levels: int) -> None:
        super().__init__()
        self.steps = nn.ModuleList(ResidualRefineStep(channels) for _ in range(levels))
        self.heads = nn.ModuleList(nn.Conv2d(channels, out_channels, 1) for _ in range(levels))

    def forward(self, prediction: torch.Tensor, stages: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        predictions = []
        passed = None
        for step, stage in zip(self.steps, stages, strict=True):
            if passed is not None:
                stage = stage + _resize(passed, stage.shape[-2:])
            prediction, passed = step(prediction, stage)
            predictions.append(prediction)
        return prediction, predictions


# mtcp.traceback -> the trace-back module class
TRACEBACKS: dict[str, type[nn.Module]] = {"official": OfficialTraceBack, "residual": ResidualTraceBack}


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
        fusion, traceback = FUSIONS[mtcp.cfm], TRACEBACKS[mtcp.traceback]
        self.fusion = nn.ModuleDict({t: fusion(channels, len(names) - 1, mtcp.attention_size) for t in names})
        self.traceback = nn.ModuleDict({t: traceback(channels, task.channels, levels) for t, task in tasks.items()})
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
            traceback = self.traceback[t]
            final, steps = traceback(fused[t], decoded[t][0])
            features[t] = final[..., :crop_h, :crop_w]
            pred[t] = self.heads[t](final, (height, width))
            if self.training:  # deep supervision only: inference never runs the intermediate heads
                heads = zip(traceback.heads, steps, strict=True)
                intermediate[t] = [resize_to_input(head(x), (height, width)) for head, x in heads]
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
