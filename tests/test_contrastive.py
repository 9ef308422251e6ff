"""The cross-task contrastive regularizer: sampling, pair relations, losses, gradients, seeding."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F

from densemtl.config import Config, ContrastiveConfig, load_config
from densemtl.data import build_dataset
from densemtl.dataset_info import DatasetInfo
from densemtl.engine.bench import run_bench
from densemtl.engine.checkpoint import load_checkpoint, load_model
from densemtl.engine.distributed import DistInfo
from densemtl.engine.objective import build_objective
from densemtl.engine.trainer import Trainer
from densemtl.errors import ConfigError
from densemtl.label_relations import ClassRelation, DepthRelation, LabelRelation, NormalsRelation
from densemtl.losses.contrastive import (
    ContrastiveRegularizer,
    build_relation,
    infonce_loss,
    labels_at,
    sample_pixels,
    triplet_loss,
)
from densemtl.models import build_model
from densemtl.tasks import IGNORE_INDEX, Task, build_tasks

INFO = DatasetInfo("toy", ("semseg", "depth", "normals", "edge", "saliency"), num_classes={"semseg": 4})
TASKS = build_tasks(list(INFO.tasks), INFO)
B, H, W, STRIDE = 2, 32, 48, 4  # labels at H x W, decoder features at H/4 x W/4


def blocky(values: torch.Tensor) -> torch.Tensor:
    """Upsample a (B, ..., h, w) map to label resolution so every 4x4 block holds one value."""
    return values.repeat_interleave(STRIDE, dim=-2).repeat_interleave(STRIDE, dim=-1)


def toy_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """Labels constant on 4x4 blocks, with ignore / invalid regions in every task."""
    gen = torch.Generator().manual_seed(seed)
    h, w = H // STRIDE, W // STRIDE
    semseg = blocky(torch.randint(0, 4, (B, h, w), generator=gen))
    semseg[:, :8] = IGNORE_INDEX
    depth = blocky(torch.tensor([1.0, 2.0, 4.0])[torch.randint(0, 3, (B, 1, h, w), generator=gen)])
    depth[..., :, :12] = 0.0
    normals = blocky(F.normalize(torch.randn(B, 3, h, w, generator=gen), dim=1))
    normals[..., -8:, :] = 0.0
    edge = blocky((torch.rand(B, 1, h, w, generator=gen) > 0.7).float())
    edge[..., :, -4:] = IGNORE_INDEX
    saliency = blocky((torch.rand(B, 1, h, w, generator=gen) > 0.5).float())
    return {"semseg": semseg, "depth": depth, "normals": normals, "edge": edge, "saliency": saliency}


def regularizer(tasks: list[str], **overrides) -> ContrastiveRegularizer:
    config = ContrastiveConfig(enabled=True, **{"num_pixels": 128, "seed": 0, **overrides})
    return ContrastiveRegularizer(config, {t: TASKS[t] for t in tasks}, {t: 8 for t in tasks})


@pytest.mark.parametrize("task", ["semseg", "depth", "normals", "edge"])
def test_sampling_takes_only_valid_distinct_pixels(task: str) -> None:
    target = toy_batch()[task]
    relation = build_relation(TASKS[task], ContrastiveConfig())
    valid = relation.valid(target)
    assert 0 < valid.sum() < valid.numel()  # the toy batch does hold invalid pixels
    for seed in range(5):
        b, y, x = sample_pixels(relation, target, 200, torch.Generator().manual_seed(seed))
        assert valid[b, y, x].all()
        assert len(set(zip(b.tolist(), y.tolist(), x.tolist(), strict=True))) == b.numel()
        assert torch.bincount(b, minlength=B).tolist() == [200, 200]


def test_sampling_stops_at_the_valid_pixels() -> None:
    target = torch.full((2, 8, 8), IGNORE_INDEX)
    target[0, 2, 3] = 1
    target[0, 5, 5] = 0
    b, y, x = sample_pixels(ClassRelation(binary=False), target, 50, torch.Generator().manual_seed(0))
    assert sorted(zip(b.tolist(), y.tolist(), x.tolist(), strict=True)) == [(0, 2, 3), (0, 5, 5)]


def test_sampling_is_class_balanced() -> None:
    target = torch.zeros(1, 64, 64, dtype=torch.long)
    target[0, :4, :4] = 1  # 16 pixels of a rare class among 4096
    target[0, 32:, :] = 2
    picked = target[sample_pixels(ClassRelation(binary=False), target, 45, torch.Generator().manual_seed(1))]
    counts = torch.bincount(picked, minlength=3)
    assert counts[1] >= 8  # about 15 expected; uniform sampling would take about 0.2 of them
    assert counts[0] >= 8 and counts[2] >= 8


def test_class_relations_follow_the_labels() -> None:
    positive, negative = ClassRelation(binary=False).relate(torch.tensor([[0], [0], [3], [1]]))
    assert positive.tolist() == [
        [False, True, False, False],
        [True, False, False, False],
        [False, False, False, False],
        [False, False, False, False],
    ]
    assert negative.tolist() == [
        [False, False, True, True],
        [False, False, True, True],
        [True, True, False, True],
        [True, True, True, False],
    ]
    edge = torch.tensor([[[[0.0, 1.0], [IGNORE_INDEX, 0.2]]]])
    relation = build_relation(TASKS["edge"], ContrastiveConfig())
    assert relation.valid(edge).tolist() == [[[True, True], [False, True]]]
    values = relation.values(edge, (torch.tensor([0, 0, 0]), torch.tensor([0, 0, 1]), torch.tensor([0, 1, 1])))
    positive, negative = relation.relate(values)
    assert positive[0, 2] and negative[0, 1] and negative[1, 2]


def test_depth_relations_use_relative_difference_with_a_gap() -> None:
    relation = DepthRelation(positive=0.05, negative=0.2)
    positive, negative = relation.relate(torch.tensor([[1.0], [1.03], [1.1], [2.0]]))
    assert positive[0, 1] and positive[1, 0] and not negative[0, 1]
    assert not positive[0, 2] and not negative[0, 2]  # 10%: in the ignored band
    assert negative[0, 3] and negative[3, 2] and not positive[0, 3]
    assert not positive.diagonal().any() and not negative.diagonal().any()
    assert relation.valid(torch.tensor([[[[0.0, 1.0]]]])).tolist() == [[[False, True]]]


def test_normals_relations_use_the_angle_with_a_gap() -> None:
    def unit(deg: float) -> list[float]:
        return [math.sin(math.radians(deg)), 0.0, math.cos(math.radians(deg))]

    relation = NormalsRelation(positive_deg=10, negative_deg=30)
    positive, negative = relation.relate(torch.tensor([unit(0), unit(5), unit(20), unit(45), unit(-40)]))
    assert positive[0, 1] and not negative[0, 1]
    assert not positive[0, 2] and not negative[0, 2]
    assert negative[0, 3] and negative[1, 4] and negative[3, 4]
    assert relation.valid(torch.zeros(1, 3, 1, 2)).tolist() == [[[False, False]]]


def test_labels_reach_the_feature_grid_by_their_cell_centres() -> None:
    labels = torch.arange(12 * 16).view(1, 12, 16)
    small = labels_at(labels, (3, 4))  # stride 4: cell (i, j) covers rows 4i..4i+3, takes row 4i+2
    assert small.tolist() == [[[labels[0, 4 * i + 2, 4 * j + 2].item() for j in range(4)] for i in range(3)]]
    depth = torch.zeros(2, 1, 7, 9)
    depth[:, :, 3, 4] = 5.0
    assert labels_at(depth, (7, 9)).equal(depth)
    odd = labels_at(depth, (3, 3))  # 7/3 rows per cell: centres at rows 1, 3, 5 and columns 1, 4, 7
    assert odd.shape == (2, 1, 3, 3) and odd[0, 0, 1, 1] == 5.0 and odd.sum() == 10.0


@pytest.mark.parametrize("loss", ["infonce", "triplet", "triplet_batch_hard"])
def test_losses_are_minimal_for_label_consistent_embeddings(loss: str) -> None:
    labels = torch.randint(0, 4, (200, 1), generator=torch.Generator().manual_seed(0))
    positive, negative = ClassRelation(binary=False).relate(labels)
    consistent = F.one_hot(labels[:, 0], 4).float()
    shuffled = consistent[torch.randperm(200, generator=torch.Generator().manual_seed(1))]
    if loss == "infonce":
        low, high = (infonce_loss(z, positive, negative, 0.1) for z in (consistent, shuffled))
        assert low < 0.05 and high > 2.0
    elif loss == "triplet":  # random triplets of shuffled codes: d_ap, d_an in {0, 1}, mean about 0.43
        low, high = (triplet_loss(z, positive, negative, 0.3, "sampled", torch.Generator().manual_seed(2))
                     for z in (consistent, shuffled))
        assert low == 0 and high > 0.3
    else:  # the hardest positive is 1 away and the nearest negative 0 for almost every anchor
        low, high = (triplet_loss(z, positive, negative, 0.3, "batch_hard") for z in (consistent, shuffled))
        assert low == 0 and high > 1.0


def _hand_triplets() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Anchor a = (1, 0) with positives p = (0.6, 0.8), p2 = (0, -1) and negative n = (0, 1).

    Cosine distances from a: p 0.4, p2 1.0, n 1.0. Only a is an anchor (the other rows have no pairs).
    """
    embedding = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, -1.0], [0.0, 1.0]])
    positive = torch.zeros(4, 4, dtype=torch.bool)
    negative = torch.zeros(4, 4, dtype=torch.bool)
    positive[0, 1] = positive[0, 2] = True
    negative[0, 3] = True
    return embedding, positive, negative


def test_triplet_loss_on_a_hand_computed_case() -> None:
    embedding, positive, negative = _hand_triplets()
    only_p = positive.clone()
    only_p[0, 2] = False  # one positive, one negative: both minings give relu(0.4 - 1.0 + margin)
    for mining in ("sampled", "batch_hard"):
        for margin, expected in ((0.3, 0.0), (0.7, 0.1), (0.8, 0.2)):
            loss = triplet_loss(embedding, only_p, negative, margin, mining, torch.Generator().manual_seed(0))
            assert loss.item() == pytest.approx(expected, abs=1e-6)
    # two positives: batch-hard always takes p2 (1.0 - 1.0 + 0.3); sampled draws p (0) or p2 (0.3)
    hard = triplet_loss(embedding, positive, negative, 0.3, "batch_hard")
    assert hard.item() == pytest.approx(0.3, abs=1e-6)
    drawn = [triplet_loss(embedding, positive, negative, 0.3, "sampled", torch.Generator().manual_seed(seed)).item()
             for seed in range(40)]
    assert set(round(value, 6) for value in drawn) == {0.0, 0.3}
    assert 0.1 < sum(drawn) / len(drawn) < 0.2  # each positive about half of the time


def test_the_default_is_the_sampled_triplet_loss() -> None:
    config = ContrastiveConfig()
    assert (config.loss, config.mining) == ("triplet", "sampled")
    embedding, positive, negative = _hand_triplets()
    reg = regularizer(["semseg", "depth"], projector_dim=2)
    reg.projectors["semseg__from__depth"] = torch.nn.Identity()

    class HandRelation(LabelRelation):
        """Pixel k carries the label k + 1 and relates to the others as row k of the hand case."""

        def valid(self, target: torch.Tensor) -> torch.Tensor:
            return target[:, 0] > 0

        def relate(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            index = values[:, 0].long() - 1
            return positive[index][:, index], negative[index][:, index]

    reg.relations["depth"] = HandRelation()
    features = embedding.T.reshape(1, 2, 2, 2)  # four pixels on a 2 x 2 grid, in the rows' order
    labels = torch.arange(1.0, 5.0).reshape(1, 1, 2, 2)
    losses = {reg.pair_loss("semseg", "depth", features, labels, torch.Generator().manual_seed(seed))[0].item()
              for seed in range(20)}
    assert {round(value, 6) for value in losses} == {0.0, 0.3}  # sampled, not batch-hard (always 0.3)


def test_losses_are_none_without_both_kinds_of_pair() -> None:
    positive, negative = ClassRelation(binary=False).relate(torch.zeros(5, 1, dtype=torch.long))
    z = F.normalize(torch.randn(5, 3), dim=1)
    assert infonce_loss(z, positive, negative, 0.1) is None
    assert triplet_loss(z, positive, negative, 0.3) is None


def identity_projectors(reg: ContrastiveRegularizer) -> None:
    """Projectors that pass non-negative features through, so embeddings = normalised features."""
    with torch.no_grad():
        for projector in reg.projectors.values():
            for layer in projector.layers:
                if isinstance(layer, torch.nn.Linear):
                    layer.weight.copy_(torch.eye(*layer.weight.shape))
                    layer.bias.zero_()


@pytest.mark.parametrize("loss", ["infonce", "triplet"])
@pytest.mark.parametrize("source", ["semseg", "depth"])
def test_regularizer_is_minimal_for_features_that_encode_the_source_labels(loss: str, source: str) -> None:
    reg = regularizer(["saliency", source], loss=loss, projector_dim=8)
    identity_projectors(reg)
    batch = toy_batch()
    label = batch[source][:, 0] if source == "depth" else batch[source]
    codes = {1.0: 0, 2.0: 1, 4.0: 2} if source == "depth" else {c: c for c in range(4)}
    ids = torch.zeros_like(label, dtype=torch.long)
    for value, code in codes.items():
        ids[label == value] = code
    one_hot = F.one_hot(ids, 8).permute(0, 3, 1, 2).float()[:, :, ::STRIDE, ::STRIDE]
    shuffled = one_hot.flatten(2)[:, :, torch.randperm(one_hot[0, 0].numel())].view_as(one_hot)
    generator = torch.Generator().manual_seed(3)
    pairs = [reg.pair_loss("saliency", source, features, batch[source], generator) for features in (one_hot, shuffled)]
    (low, usable), (high, _) = pairs
    assert usable
    assert low.item() < 0.05 and high.item() > 5 * max(low.item(), 0.05)  # sampled triplets: about 0.4


def test_gradients_reach_every_decoder_feature_and_the_used_projectors() -> None:
    names = ["semseg", "depth", "normals", "edge"]
    reg = regularizer(names)
    features = {t: torch.randn(B, 8, H // STRIDE, W // STRIDE, requires_grad=True) for t in names}
    total = reg(features, toy_batch())
    assert total > 0
    total.backward()
    for name in names:
        assert features[name].grad is not None and features[name].grad.abs().sum() > 0
    used = {key.replace("<-", "__from__") for key in reg.last_losses}
    assert len(used) == len(names)
    for key, projector in reg.projectors.items():
        grad = projector.layers[0].weight.grad
        assert (grad is not None and grad.abs().sum() > 0) == (key in used)


def test_weight_scales_the_regularizer() -> None:
    names = ["semseg", "depth"]
    features = {t: torch.randn(B, 8, H // STRIDE, W // STRIDE) for t in names}
    torch.manual_seed(0)
    one = regularizer(names, weight=1.0)(features, toy_batch())
    torch.manual_seed(0)
    half = regularizer(names, weight=0.5)(features, toy_batch())
    torch.testing.assert_close(half, one * 0.5)


def test_degenerate_batches_give_a_zero_that_backpropagates() -> None:
    names = ["semseg", "edge"]
    reg = regularizer(names)
    features = {t: torch.randn(B, 8, H // STRIDE, W // STRIDE, requires_grad=True) for t in names}
    batch = {"semseg": torch.full((B, H, W), IGNORE_INDEX), "edge": torch.zeros(B, 1, H, W)}  # edge: one class
    total = reg(features, batch)
    assert total.item() == 0.0 and total.requires_grad
    total.backward()
    assert reg.last_losses == {}
    grads = [projector.layers[0].weight.grad for projector in reg.projectors.values()]
    assert all(grad is not None and not grad.any() for grad in grads)  # zero, but present on every rank


def test_the_same_seed_reproduces_sources_and_samples() -> None:
    names = ["semseg", "depth", "normals", "edge"]
    features = {t: torch.randn(B, 8, H // STRIDE, W // STRIDE) for t in names}
    first, second = regularizer(names, seed=7, num_pixels=16), regularizer(names, seed=7, num_pixels=16)
    second.load_state_dict(first.state_dict())  # same projectors, so only the draws can differ
    runs = [[reg(features, toy_batch()).item() for _ in range(3)] for reg in (first, second)]
    assert runs[0] == runs[1]
    assert len(set(runs[0])) == 3  # the call count moves the draws on
    resumed = regularizer(names, seed=7, num_pixels=16)
    resumed.load_state_dict(first.state_dict())
    assert resumed(features, toy_batch()).item() == first(features, toy_batch()).item()
    other = regularizer(names, seed=8, num_pixels=16)
    other.load_state_dict(first.state_dict())
    assert other(features, toy_batch()).item() != resumed(features, toy_batch()).item()
    with_generator = [first(features, toy_batch(), torch.Generator().manual_seed(5)).item() for _ in range(2)]
    assert with_generator[0] == with_generator[1]


def test_bad_settings_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="two tasks"):
        regularizer(["semseg"])
    with pytest.raises(ConfigError, match="temperature"):
        regularizer(["semseg", "depth"], temperature=0.0)
    with pytest.raises(ConfigError, match="depth_positive"):
        regularizer(["semseg", "depth"], depth_positive=0.3, depth_negative=0.1)
    with pytest.raises(ConfigError, match="no decoder features"):
        ContrastiveRegularizer(ContrastiveConfig(), {t: TASKS[t] for t in ["semseg", "depth"]}, {"semseg": 8})
    reg = regularizer(["semseg", "depth"])
    with pytest.raises(ConfigError, match="depth"):
        reg({"semseg": torch.randn(B, 8, 8, 12)}, toy_batch())


class SignRelation(LabelRelation):
    """A toy rule: pixels whose signed label has the same sign are positives (0 = invalid)."""

    def valid(self, target: torch.Tensor) -> torch.Tensor:
        return target[:, 0] != 0

    def relate(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        same = values[:, 0].sign()[:, None] == values[:, 0].sign()[None, :]
        return same & ~torch.eye(len(values), dtype=torch.bool), ~same


@dataclass(frozen=True)
class SignedTask(Task):
    """A task class defined outside densemtl that brings its own contrastive rule."""

    name: ClassVar[str] = "signed"

    def label_relation(self, thresholds: ContrastiveConfig) -> LabelRelation:
        return SignRelation()


@dataclass(frozen=True)
class RulelessTask(Task):
    name: ClassVar[str] = "ruleless"


def test_a_task_class_brings_its_own_rule_for_positives_and_negatives() -> None:
    tasks = {"semseg": TASKS["semseg"], "signed": SignedTask()}
    reg = ContrastiveRegularizer(ContrastiveConfig(enabled=True, num_pixels=64, seed=0), tasks, {t: 8 for t in tasks})
    identity_projectors(reg)
    signed = torch.where(toy_batch()["saliency"] > 0.5, 1.0, -1.0)
    signed[..., :8, :] = 0.0  # invalid: never sampled
    sample = sample_pixels(reg.relations["signed"], signed, 100, torch.Generator().manual_seed(0))
    assert (signed[sample[0], 0, sample[1], sample[2]] != 0).all()
    one_hot = torch.cat([signed > 0, signed < 0, torch.zeros(B, 6, H, W, dtype=torch.bool)], dim=1).float()
    features = one_hot[:, :, ::STRIDE, ::STRIDE]
    loss, usable = reg.pair_loss("semseg", "signed", features, signed, torch.Generator().manual_seed(1))
    assert usable and loss.item() < 0.05  # features that encode the sign satisfy the toy rule
    with pytest.raises(ConfigError, match="task 'ruleless' has no rule for positives and negatives"):
        ContrastiveRegularizer(ContrastiveConfig(), {"semseg": TASKS["semseg"], "ruleless": RulelessTask()},
                               {"semseg": 8, "ruleless": 8})


def tiny_config(tmp_path: Path, *overrides: str) -> Config:
    """A unit-test-sized synthetic run with the regularizer on: 32x48 frames, batch 4, the CPU backbone."""
    return load_config(
        None,
        [
            "data.synthetic.height=32", "data.synthetic.width=48", "data.synthetic.num_train=8",
            "data.synthetic.num_val=2", "data.synthetic.num_test=2", f"data.synthetic.cache_dir={tmp_path / 'cache'}",
            "data.tasks=[semseg,depth,normals,edge]", "data.batch_size=4", "model.backbone=resnet-tiny",
            "model.neck_channels=16", "model.head_channels=16", "train.device=cpu", "train.steps=3",
            "train.warmup_steps=1", "train.log_every=1", "train.eval_every=1000", "train.checkpoint_every=1000",
            "contrastive.enabled=true", "contrastive.num_pixels=64", f"out_dir={tmp_path / 'run'}", *overrides,
        ],
    )


def test_training_updates_the_projectors_but_the_saved_model_has_none(tmp_path: Path) -> None:
    config = tiny_config(tmp_path)
    torch.manual_seed(config.train.seed)
    train_set = build_dataset(config.data, "train", train=True)
    tasks = build_tasks(config.data.tasks, train_set.info)
    model = build_model(config, train_set.info, tasks)
    objective = build_objective(config, tasks, model.feature_channels)
    before = {k: v.clone() for k, v in objective.regularizer.state_dict().items()}
    trainer = Trainer(
        config, model, objective, train_set, config.out_dir, info=train_set.info,
        dist_info=DistInfo(), device=torch.device("cpu"),
    )
    trainer.fit()
    log = [json.loads(line) for line in (Path(config.out_dir) / "log.jsonl").read_text().splitlines()]
    assert all(record["loss/contrastive"] > 0 for record in log if record["kind"] == "train")
    state = load_checkpoint(Path(config.out_dir) / "checkpoints" / "last.pt")
    plain = build_model(tiny_config(tmp_path, "contrastive.enabled=false"), train_set.info, tasks)
    assert set(state["model"]) == set(plain.state_dict())  # no projector in the inference weights
    assert not any("projector" in key for key in state["model"])
    saved = {k.removeprefix("regularizer."): v for k, v in state["objective"].items() if k.startswith("regularizer.")}
    assert saved["calls"] == 3
    changed = [k for k in before if k != "calls" and not torch.equal(before[k], saved[k])]
    assert changed  # the optimiser reached the projectors drawn during the 3 steps
    assert load_model(Path(config.out_dir) / "checkpoints" / "last.pt").model.feature_channels == model.feature_channels


def test_bench_counts_are_the_same_with_and_without_the_regularizer(tmp_path: Path) -> None:
    figures = [
        run_bench(tiny_config(tmp_path, f"contrastive.enabled={flag}"), tmp_path / f"bench_{flag}.json", repeats=1)
        for flag in ("true", "false")
    ]
    assert figures[0]["parameters"] == figures[1]["parameters"]
    assert figures[0]["gflops"] == figures[1]["gflops"]


@pytest.mark.parametrize("arch", ["multitask", "mtcp"])
def test_gradients_reach_the_network_of_each_architecture(tmp_path: Path, arch: str) -> None:
    config = tiny_config(tmp_path, f"model.arch={arch}", "mtcp.attention_size=4")
    info = DatasetInfo("synthetic", tuple(config.data.tasks), num_classes={"semseg": 4})
    tasks = build_tasks(config.data.tasks, info)
    torch.manual_seed(0)
    model = build_model(config, info, tasks)
    reg = ContrastiveRegularizer(config.contrastive, tasks, model.feature_channels)
    output = model(torch.randn(2, 3, H, W))
    batch = {name: value for name, value in toy_batch().items() if name in tasks}
    reg(output["features"], batch).backward()
    for name in tasks:  # every task's own decoder receives a gradient from the regularizer
        owned = [p.grad for key, p in model.named_parameters() if f".{name}." in f".{key}"]
        assert owned and any(grad is not None and grad.abs().sum() > 0 for grad in owned)
