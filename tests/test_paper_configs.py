"""The paper-scale configs of MT-CP and of the contrastive regularizer: each builds at its full size
(on the meta device: no memory, no time), and takes one training step on a tiny random batch.

The training step overrides the size in the test, never in the file: 64 x 64 images, and a shrunken
backbone of the same family (a Swin-S or ViT-L step takes tens of seconds and gigabytes on a CPU, too much
for the suite), so what it checks is that every other value of the file (tasks, decoders, CFM, trace-back,
balancer arguments, regularizer) builds and back-propagates.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from densemtl.config import load_config
from densemtl.engine.bench import dataset_info
from densemtl.engine.objective import build_objective
from densemtl.models import build_model
from densemtl.tasks import build_tasks

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# file -> (backbone parameters at full size in millions: low, high), and the overrides that shrink it
PAPER_CONFIGS = {
    "nyud_mtcp.yaml": ((45, 55), ["model.backbone_args.embed_dim=24", "model.backbone_args.depths=[1,1,1,1]"]),
    "pascal_mtcp.yaml": ((45, 55), ["model.backbone_args.embed_dim=24", "model.backbone_args.depths=[1,1,1,1]"]),
    "nyud_contrastive.yaml": ((300, 330), [
        "model.backbone_args.hidden_size=32", "model.backbone_args.num_hidden_layers=4",
        "model.backbone_args.num_attention_heads=2", "model.backbone_args.intermediate_size=64",
        "model.feature_layers=[1,2,3,4]"]),
    "pascal_contrastive.yaml": ((300, 330), [
        "model.backbone_args.hidden_size=32", "model.backbone_args.num_hidden_layers=4",
        "model.backbone_args.num_attention_heads=2", "model.backbone_args.intermediate_size=64",
        "model.feature_layers=[1,2,3,4]"]),
}


def random_targets(tasks: dict, batch: int, size: int) -> dict[str, torch.Tensor]:
    """Targets in each task's format: class maps, depth in metres, unit normals, binary maps."""
    generator = torch.Generator().manual_seed(0)
    targets = {}
    for name, task in tasks.items():
        if name in ("semseg", "human_parts"):
            targets[name] = torch.randint(0, task.channels, (batch, size, size), generator=generator)
        elif name == "normals":
            targets[name] = F.normalize(torch.randn(batch, 3, size, size, generator=generator), dim=1)
        elif name == "depth":
            targets[name] = torch.rand(batch, 1, size, size, generator=generator) * 5 + 0.5
        else:
            targets[name] = (torch.rand(batch, 1, size, size, generator=generator) > 0.5).float()
    return targets


@pytest.mark.parametrize("name", sorted(PAPER_CONFIGS))
def test_paper_config_builds_at_full_size(name: str) -> None:
    config = load_config(CONFIGS / name)
    info = dataset_info(config)
    with torch.device("meta"):
        model = build_model(config, info, build_tasks(config.data.tasks, info))
    low, high = PAPER_CONFIGS[name][0]
    assert low * 1e6 < sum(p.numel() for p in model.backbone.parameters()) < high * 1e6


@pytest.mark.parametrize("name", sorted(PAPER_CONFIGS))
def test_paper_config_takes_a_training_step_at_reduced_size(name: str) -> None:
    config = load_config(CONFIGS / name, PAPER_CONFIGS[name][1])
    info = dataset_info(config)
    tasks = build_tasks(config.data.tasks, info, config.loss.normals_loss)
    torch.manual_seed(0)
    model = build_model(config, info, tasks).train()
    objective = build_objective(config, tasks, model.feature_channels, steps_per_epoch=10)
    batch = random_targets(tasks, 2, 64)
    output = model(torch.randn(2, 3, 64, 64))
    total, figures = objective(output, batch, step=0, shared=list(model.backbone.parameters()))
    total.backward()
    assert torch.isfinite(total)
    assert all(p.grad is not None for p in model.backbone.parameters() if p.requires_grad)
    if config.contrastive.enabled:
        assert figures["loss/contrastive"] > 0
    if config.model.arch == "mtcp":  # deep supervision outside the task weighting, as the released code
        assert figures["loss/deep_supervision"] > 0
