"""MT-CP network: shapes through every module for NYUD, PASCAL and synthetic task sets; the
trace-back's intermediate heads and the fusion's cross-task gates receive gradient."""

from __future__ import annotations

import pytest
import torch

from densemtl.config import Config
from densemtl.dataset_info import DatasetInfo
from densemtl.models import build_model
from densemtl.models.mtcp import CrossTaskFusion, TaskDecoder, TraceBack, cosine_consistency
from densemtl.tasks import build_tasks

TASK_SETS = {
    "nyud": (["semseg", "depth", "normals", "edge"], {"semseg": 40}),
    "pascal": (["semseg", "human_parts", "saliency", "normals", "edge"], {"semseg": 21, "human_parts": 7}),
    "synthetic": (["semseg", "depth", "normals", "edge", "saliency"], {"semseg": 8}),
}


def _model(dataset: str, **mtcp):
    names, classes = TASK_SETS[dataset]
    info = DatasetInfo(name=dataset, tasks=tuple(names), num_classes=classes)
    config = Config()
    config.model.arch = "mtcp"
    config.model.backbone = "resnet-tiny"
    config.model.neck_channels = 16
    config.model.head_channels = 16
    for key, value in mtcp.items():
        setattr(config.mtcp, key, value)
    tasks = build_tasks(names, info)
    torch.manual_seed(0)
    return build_model(config, info, tasks), tasks


@pytest.mark.parametrize("dataset", sorted(TASK_SETS))
def test_output_shapes(dataset):
    model, tasks = _model(dataset, consistency_weight=0.1)
    image = torch.randn(2, 3, 72, 100)  # not a multiple of 32: exercises padding and cropping
    out = model(image)
    assert set(out["pred"]) == set(tasks) == set(out["features"]) == set(out["intermediate"])
    for name, task in tasks.items():
        assert out["pred"][name].shape == (2, task.channels, 72, 100)
        assert out["features"][name].shape == (2, model.feature_channels[name], 18, 25)
        assert len(out["intermediate"][name]) == 4
        for raw in out["intermediate"][name]:
            assert raw.shape == (2, task.channels, 18, 25)
    assert set(out["extra_losses"]) == {"consistency"} and out["extra_losses"]["consistency"].dim() == 0


def test_module_shapes():
    levels = [torch.randn(1, 8, 16 // s, 24 // s) for s in (1, 2, 4, 8)]
    stages, fused = TaskDecoder(8, 12, 4)(levels)
    assert [tuple(s.shape[-2:]) for s in stages] == [(2, 3), (4, 6), (8, 12), (16, 24)]
    assert fused.shape == (1, 12, 16, 24)
    for size in (None, 4, 64):
        cfm = CrossTaskFusion(12, 2, size)
        assert cfm(fused, [torch.randn_like(fused), torch.randn_like(fused)]).shape == fused.shape
    assert CrossTaskFusion(12, 0, 4)(fused, []).shape == fused.shape  # a single task: no auxiliary branch
    final, intermediate = TraceBack(12, 3, 4)(fused, stages)
    assert final.shape == fused.shape and [tuple(x.shape) for x in intermediate] == [(1, 3, 16, 24)] * 4


def test_bounded_attention_pools_keys_only():
    cfm = CrossTaskFusion(8, 1, 4)
    x = torch.randn(1, 8, 12, 16)
    assert cfm.key_grid(12, 16) == (3, 4) and cfm.key_grid(3, 2) == (3, 2)
    assert CrossTaskFusion(8, 1, None).key_grid(120, 160) == (120, 160)
    # with a grid at least as large as the map, bounded and full attention coincide
    full, bounded = CrossTaskFusion(8, 1, None), CrossTaskFusion(8, 1, 16)
    with torch.no_grad():
        full.gamma.fill_(1.0)  # starts at 0, which would hide the attention branch
    bounded.load_state_dict(full.state_dict())
    full.eval(), bounded.eval()
    other = torch.randn_like(x)
    torch.testing.assert_close(full(x, [other]), bounded(x, [other]))


def test_every_stage_head_and_gate_gets_gradient():
    model, tasks = _model("nyud", consistency_weight=0.1)
    out = model(torch.randn(2, 3, 64, 64))
    loss = sum(raw.float().pow(2).mean() for raws in out["intermediate"].values() for raw in raws)
    loss.backward()
    for name in tasks:
        for head in model.traceback[name].heads:
            assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0
        # intermediate losses reach the decoder and, through the fusion gates, the other tasks
        assert model.decoders[name].fuse[0].weight.grad.abs().sum() > 0
        assert all(gate.weight.grad.abs().sum() > 0 for gate in model.fusion[name].gates)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.backbone.parameters())


def test_consistency_term():
    a = torch.randn(2, 4, 5, 5)
    assert cosine_consistency([a, a.clone(), 3 * a]).item() == pytest.approx(0.0, abs=1e-6)
    assert cosine_consistency([a, -a]).item() == pytest.approx(2.0, abs=1e-6)
    model, _ = _model("synthetic", consistency_weight=0.0)
    assert model.projectors is None and model(torch.randn(2, 3, 32, 32))["extra_losses"] == {}
    weighted, _ = _model("synthetic", consistency_weight=0.5)
    unit, _ = _model("synthetic", consistency_weight=1.0)
    image = torch.randn(1, 3, 32, 32)
    weighted.eval(), unit.eval()
    half = weighted(image)["extra_losses"]["consistency"]
    whole = unit(image)["extra_losses"]["consistency"]
    assert half.item() == pytest.approx(0.5 * whole.item(), rel=1e-5) and whole.item() > 0


def test_config_trains_end_to_end(tmp_path):
    """configs/synthetic_mtcp.yaml through the engine: MT-CP + LPS, deep supervision, balancer state saved."""
    from pathlib import Path

    from densemtl.config import load_config
    from densemtl.engine.run import run_training

    config_path = Path(__file__).resolve().parents[1] / "configs" / "synthetic_mtcp.yaml"
    overrides = [
        "train.steps=4",
        "train.eval_every=4",
        "train.checkpoint_every=4",
        "train.log_every=1",
        "train.warmup_steps=0",
        "data.batch_size=2",
        "data.eval_batch_size=4",
        "data.synthetic.height=32",
        "data.synthetic.width=64",
        "data.synthetic.num_train=8",
        "data.synthetic.num_val=4",
        "data.synthetic.num_test=4",
        f"data.synthetic.cache_dir={tmp_path / 'cache'}",
        "model.neck_channels=8",
        "model.head_channels=8",
        "eval.boundary_thresholds=5",
        "loss.balancer_args.window=1",
        f"out_dir={tmp_path / 'run'}",
    ]
    results = run_training(load_config(config_path, overrides))
    assert set(results) == {"semseg", "depth", "normals", "edge", "saliency"}
    log = (tmp_path / "run" / "log.jsonl").read_text()
    assert '"loss/edge_intermediate"' in log and '"weight/edge"' in log
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    balancer = {k: v for k, v in state["objective"].items() if k.startswith("balancer.")}
    assert int(balancer["balancer.completed"]) == 3  # windows of one step: closed at steps 1, 2, 3
