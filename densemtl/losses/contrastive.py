"""Cross-task contrastive regularization (Yang, Ye, Xu; AAAI 2023): training only, free at inference.

Each call, every target task ``t`` draws a source task ``s != t``. A projector owned by the pair
``(t, s)`` (a 1x1-conv MLP with an L2-normalised output) embeds ``t``'s decoder features at pixels
sampled from the batch, and ``s``'s ground truth decides which pairs of those pixels must embed close
(positives) and which far apart (negatives). So each decoder is pushed to carry the structure of the
other tasks' labels, while the projectors are dropped at inference: the model itself is unchanged.

What follows the paper and what is densemtl's (the paper's method section was not available to us;
its figure captions were: a random source per target and iteration, one projector per task pair
producing a projection map, pixels sampled with positives and negatives defined by the source's
ground truth, a triplet loss on the selected pixels). docs/results/contrastive.md has the full table.

- **Where pixels are sampled.** The source labels are brought to the decoder feature grid by nearest
  neighbour (each cell takes the label at its centre pixel), so a sampled feature vector and its label
  describe the same place exactly; bilinear reads of the features at label positions would blend
  neighbouring cells across object borders, where no feature can be consistent with both sides.
  ``num_pixels`` cells per batch (split evenly over its images, so the N x N pair matrices cost the
  same whatever the batch size) are drawn without replacement, only among the pixels the source's
  relation calls valid (never ignore labels, nor padding, which carries those fill values). Where the
  source has classes each cell is weighted by ``1 / (cells of its class in the image)``, so every
  present class gets about the same share. The projector runs on the sampled vectors only: the same
  1x1-conv MLP as on the whole embedding map, at a cost proportional to the samples instead of the map.
- **Pairs** are formed between all samples of the batch (across images too); the source task's
  :class:`~densemtl.label_relations.LabelRelation` (:meth:`densemtl.tasks.Task.label_relation`, with
  the thresholds of ``config.contrastive``) says which are positives, negatives or ignored.
- **Losses** on cosine similarities of the unit embeddings; an anchor counts only when it has at least
  one positive and one negative. ``triplet`` (default, the paper's loss): each sampled pixel is an
  anchor with one positive and one negative, ``relu(d_ap - d_an + margin)`` with ``d = 1 - cos``;
  ``mining: sampled`` (default) draws the positive and the negative at random among the anchor's,
  ``batch_hard`` takes the farthest positive and the nearest negative. ``infonce`` (an option):
  supervised-contrastive with several positives, each positive contrasted against all the anchor's
  negatives, ``mean_p softplus(logsumexp_n(s_an / T) - s_ap / T)``.
- **Total**: ``weight`` x the mean over target tasks that had at least one usable anchor; a batch
  with none gives a zero that still carries a graph (so ``backward`` works).
- **Randomness** (source draws and samples) comes from the ``generator`` passed in, or else from a
  generator seeded with ``(seed, call count)``; the count is a buffer, saved with the state dict, so a
  resumed run draws what an uninterrupted one would, and the global RNG stream is left untouched.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from densemtl.config import ContrastiveConfig
from densemtl.constants import IGNORE_INDEX
from densemtl.errors import ConfigError
from densemtl.label_relations import LabelRelation, Sample
from densemtl.tasks import Task


def build_relation(task: Task, config: ContrastiveConfig) -> LabelRelation:
    """The source task's rule for positives and negatives; a task without one is a configuration error."""
    relation = task.label_relation(config)
    if relation is None:
        raise ConfigError(f"contrastive: task '{task.name}' has no rule for positives and negatives")
    return relation


def sample_pixels(
    relation: LabelRelation, target: torch.Tensor, num_pixels: int, generator: torch.Generator
) -> Sample:
    """Up to ``num_pixels`` distinct valid pixels per image, class-balanced where the source has classes.

    Weighted sampling without replacement by exponential keys (Efraimidis-Spirakis): the top-k of
    ``log(u) / w`` over each image; invalid pixels have weight zero and are never taken.
    """
    valid = relation.valid(target)
    batch, height, width = valid.shape
    weight = valid.flatten(1).float()
    classes = relation.classes(target)
    if classes is not None:
        flat = classes.flatten(1).clamp(0, IGNORE_INDEX)
        counts = torch.zeros(batch, IGNORE_INDEX + 1, device=flat.device).scatter_add_(1, flat, weight)
        weight = weight / counts.gather(1, flat).clamp_min(1.0)
    uniform = torch.rand(weight.shape, generator=generator, device=generator.device).to(weight.device)
    keys = torch.where(weight > 0, uniform.clamp_min(1e-12).log() / weight, -math.inf)
    top = keys.topk(min(num_pixels, height * width), dim=1)
    b, k = torch.nonzero(torch.isfinite(top.values), as_tuple=True)
    index = top.indices[b, k]
    return b, torch.div(index, width, rounding_mode="floor"), index % width


def labels_at(target: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour downsampling to the feature grid: each cell takes the label at its centre pixel.

    Indexing (not interpolation) keeps label values exact: ignore values stay ignore values.
    """
    height, width = target.shape[-2:]
    rows = ((torch.arange(size[0], device=target.device) + 0.5) * height / size[0]).long().clamp_max(height - 1)
    cols = ((torch.arange(size[1], device=target.device) + 0.5) * width / size[1]).long().clamp_max(width - 1)
    return target.index_select(-2, rows).index_select(-1, cols)


def infonce_loss(
    embedding: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor, temperature: float
) -> torch.Tensor | None:
    """Multi-positive InfoNCE over unit embeddings; None when no anchor has both kinds of pair."""
    anchors = positive.any(dim=1) & negative.any(dim=1)
    if not anchors.any():
        return None
    logits = embedding[anchors] @ embedding.T / temperature
    pos, neg = positive[anchors], negative[anchors]
    negatives = logits.masked_fill(~neg, -math.inf).logsumexp(dim=1, keepdim=True)
    per_pair = F.softplus(negatives - logits) * pos
    return (per_pair.sum(dim=1) / pos.sum(dim=1)).mean()


def _sampled_pair(distance: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor,
                  generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One positive and one negative per anchor, each drawn uniformly among the anchor's own."""

    def pick(mask: torch.Tensor) -> torch.Tensor:
        keys = torch.rand(mask.shape, generator=generator, device=generator.device if generator else None)
        index = keys.to(mask.device).masked_fill(~mask, -1.0).argmax(dim=1, keepdim=True)
        return distance.gather(1, index)[:, 0]

    return pick(positive), pick(negative)


def _hardest_pair(distance: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor,
                  generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The farthest positive and the nearest negative of each anchor (batch-hard mining)."""
    hardest_positive = distance.masked_fill(~positive, -math.inf).amax(dim=1)
    hardest_negative = distance.masked_fill(~negative, math.inf).amin(dim=1)
    return hardest_positive, hardest_negative


# contrastive.mining -> (anchor-positive, anchor-negative) distances of each anchor's triplet
MINING = {"sampled": _sampled_pair, "batch_hard": _hardest_pair}


def triplet_loss(
    embedding: torch.Tensor,
    positive: torch.Tensor,
    negative: torch.Tensor,
    margin: float,
    mining: str = "sampled",
    generator: torch.Generator | None = None,
) -> torch.Tensor | None:
    """``mean relu(d_ap - d_an + margin)`` over anchors, ``d = 1 - cos``; None when no anchor has both
    kinds of pair. Every sampled pixel with a positive and a negative is an anchor; ``mining`` picks its
    positive and negative (``sampled``: drawn at random, ``batch_hard``: the hardest of each)."""
    anchors = positive.any(dim=1) & negative.any(dim=1)
    if not anchors.any():
        return None
    distance = 1 - embedding[anchors] @ embedding.T
    d_ap, d_an = MINING[mining](distance, positive[anchors], negative[anchors], generator)
    return F.relu(d_ap - d_an + margin).mean()


class Projector(nn.Module):
    """1x1-conv MLP (as a per-pixel linear map on sampled vectors) with an L2-normalised output."""

    def __init__(self, in_channels: int, dim: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(in_channels, in_channels), nn.ReLU(inplace=True), nn.Linear(in_channels, dim)
        )

    def forward(self, vectors: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.layers(vectors), dim=1)


def _pair_key(target: str, source: str) -> str:
    return f"{target}__from__{source}"


class ContrastiveRegularizer(nn.Module):
    """The weighted cross-task contrastive term; holds one projector per (target, source) pair."""

    def __init__(self, config: ContrastiveConfig, tasks: dict[str, Task], feature_channels: dict[str, int]) -> None:
        super().__init__()
        _check(config, tasks, feature_channels)
        self.config = config
        self.task_names = list(tasks)
        self.relations = {name: build_relation(task, config) for name, task in tasks.items()}
        self.projectors = nn.ModuleDict(
            {
                _pair_key(target, source): Projector(feature_channels[target], config.projector_dim)
                for target in tasks
                for source in tasks
                if source != target
            }
        )
        self.seed = torch.initial_seed() if config.seed is None else config.seed
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.last_losses: dict[str, torch.Tensor] = {}  # "target<-source": unweighted loss of the last call

    def _generator(self, device: torch.device) -> torch.Generator:
        generator = torch.Generator(device=device)
        generator.manual_seed((self.seed * 1_000_003 + int(self.calls)) % 2**63)
        return generator

    def pair_loss(
        self, target: str, source: str, features: torch.Tensor, labels: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, bool]:
        """Unweighted loss of target's features against source's labels, and whether any anchor had pairs.

        Without anchors the loss is a zero that still reaches the pair's projector, so every rank of a
        distributed run holds a gradient for the same projectors (the source draws agree across ranks).
        """
        relation = self.relations[source]
        labels = labels_at(labels, tuple(features.shape[-2:]))
        per_image = -(-self.config.num_pixels // labels.shape[0])
        sample = sample_pixels(relation, labels, per_image, generator)
        b, y, x = sample
        embedding = self.projectors[_pair_key(target, source)](features[b, :, y, x].float())
        positive, negative = relation.relate(relation.values(labels, sample))
        if self.config.loss == "triplet":
            loss = triplet_loss(embedding, positive, negative, self.config.margin, self.config.mining, generator)
        else:
            loss = infonce_loss(embedding, positive, negative, self.config.temperature)
        if loss is None:
            return embedding.sum() * 0.0, False
        return loss, True

    def forward(
        self, features: dict[str, torch.Tensor], batch: dict, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """``weight`` x the mean of the pair losses over targets with anchors (zero, with a graph, if none)."""
        missing = [name for name in self.task_names if name not in features or name not in batch]
        if missing:
            raise ConfigError(f"contrastive: no decoder features or labels for task(s) {', '.join(missing)}")
        if generator is None:
            generator = self._generator(next(iter(features.values())).device)
        self.calls += 1
        used, unused = [], []
        self.last_losses = {}
        for target in self.task_names:
            others = [name for name in self.task_names if name != target]
            source = others[int(torch.randint(len(others), (1,), generator=generator, device=generator.device))]
            loss, usable = self.pair_loss(target, source, features[target], batch[source], generator)
            (used if usable else unused).append(loss)
            if usable:
                self.last_losses[f"{target}<-{source}"] = loss.detach()
        total = torch.stack(unused).sum() if unused else 0.0
        if used:
            total = total + self.config.weight * torch.stack(used).mean()
        return total


def _check(config: ContrastiveConfig, tasks: dict[str, Task], feature_channels: dict[str, int]) -> None:
    """Value checks that would otherwise surface as obscure tensor errors mid-training."""

    def fail(key: str, why: str) -> None:
        raise ConfigError(f"contrastive.{key}: {why}")

    if len(tasks) < 2:
        fail("enabled", f"needs at least two tasks (a source differs from its target), got {list(tasks)}")
    for name in tasks:
        if name not in feature_channels:
            fail("enabled", f"the model exposes no decoder features for task '{name}'")
    if config.num_pixels < 2:
        fail("num_pixels", f"must be at least 2, got {config.num_pixels}")
    if config.projector_dim < 1:
        fail("projector_dim", f"must be positive, got {config.projector_dim}")
    if config.temperature <= 0:
        fail("temperature", f"must be positive, got {config.temperature}")
    if config.margin < 0:
        fail("margin", f"must be >= 0, got {config.margin}")
    if not 0 <= config.depth_positive <= config.depth_negative:
        fail("depth_positive", "expected 0 <= depth_positive <= depth_negative")
    if not 0 <= config.normals_positive_deg <= config.normals_negative_deg <= 180:
        fail("normals_positive_deg", "expected 0 <= normals_positive_deg <= normals_negative_deg <= 180")
