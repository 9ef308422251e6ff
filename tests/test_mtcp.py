"""MT-CP network: the released layout of the CFM (shape, size at 3 tasks / 256 channels, unscaled
attention from the other tasks, gradient to every input) and of the trace-back (three steps, two
intermediate heads), densemtl's earlier variants, and shapes for NYUD, PASCAL and synthetic task sets."""

from __future__ import annotations

import pytest
import torch

from densemtl.config import Config
from densemtl.dataset_info import DatasetInfo
from densemtl.errors import ConfigError
from densemtl.models import build_model
from densemtl.models.mtcp import (
    BoundedFusion,
    OfficialFusion,
    OfficialTraceBack,
    ResidualTraceBack,
    TaskDecoder,
    cosine_consistency,
    key_grid,
)
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


@pytest.mark.parametrize(("dataset", "layout"), [("nyud", "official"), ("pascal", "official"),
                                                 ("synthetic", "official"), ("synthetic", "residual")])
def test_output_shapes(dataset, layout):
    model, tasks = _model(dataset, consistency_weight=0.1, traceback=layout)
    image = torch.randn(2, 3, 72, 100)  # not a multiple of 32: exercises padding and cropping
    out = model(image)
    assert set(out["pred"]) == set(tasks) == set(out["features"]) == set(out["intermediate"])
    for name, task in tasks.items():
        assert out["pred"][name].shape == (2, task.channels, 72, 100)
        assert out["features"][name].shape == (2, model.feature_channels[name], 18, 25)
        # deep supervision at the input size: 2 heads (official: steps at 1/16 and 1/8), 4 (residual)
        assert [tuple(raw.shape) for raw in out["intermediate"][name]] == [(2, task.channels, 72, 100)] * (
            2 if layout == "official" else 4
        )
    assert set(out["extra_losses"]) == {"consistency"} and out["extra_losses"]["consistency"].dim() == 0
    model.eval()
    assert model(image)["intermediate"] == {}  # inference never runs the intermediate heads


def test_official_cfm_shape_and_gradient_to_every_input():
    own, others = torch.randn(2, 12, 6, 8, requires_grad=True), [torch.randn(2, 12, 6, 8, requires_grad=True)
                                                                  for _ in range(3)]
    cfm = OfficialFusion(12, 3, None)
    out = cfm(own, others)
    assert out.shape == own.shape
    (out * torch.randn_like(out)).sum().backward()
    for x in [own, *others]:  # values from the own task, queries and keys from every other task
        assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is not None for name, p in cfm.named_parameters() if "spatial.1" not in name)
    with pytest.raises(ConfigError, match="mtcp.cfm.*two tasks"):
        OfficialFusion(12, 0, None)


def test_official_cfm_is_the_released_module_at_three_tasks_and_256_channels():
    cfm = OfficialFusion(256, 2, None)
    shapes = {name: tuple(p.shape) for name, p in cfm.named_parameters()}
    assert shapes["gates.0.weight"] == shapes["gates.1.weight"] == (256, 256, 1, 1)
    assert shapes["merge.0.weight"] == (512, 512, 1, 1)
    assert shapes["query.0.mlp.0.weight"] == (32, 512) and shapes["value.0.mlp.0.weight"] == (16, 256)
    # CBAM(C) = MLP C -> C/16 -> C with biases + 7x7 conv 2 -> 1 + BN(1); counted by hand
    cbam = {256: 256 * 16 + 16 + 16 * 256 + 256 + 98 + 2, 512: 512 * 32 + 32 + 32 * 512 + 512 + 98 + 2}
    expected = (
        2 * (cbam[256] + 2 * 256)  # value and output: CBAM + BN(256)
        + 2 * (256 * 256 + 256)  # one gate per other task
        + 512 * 512 + 512  # merge of the gated pair to 2C
        + 2 * (cbam[512] + 2 * 512)  # query and key branches: CBAM + BN(512)
    )
    assert sum(p.numel() for p in cfm.parameters()) == expected == 481264


def test_official_cfm_attends_without_scaling_and_without_residual():
    torch.manual_seed(0)
    cfm = OfficialFusion(8, 2, None).eval()
    own, others = torch.randn(1, 8, 3, 4), [torch.randn(1, 8, 3, 4) for _ in range(2)]
    gated = torch.cat([x * torch.sigmoid(gate(x)) for gate, x in zip(cfm.gates, others, strict=True)], dim=1)
    merged = cfm.merge(gated)
    query, key = cfm.query(merged).flatten(2), cfm.key(merged).flatten(2)  # 1 x 2C x HW
    values = cfm.value(own).flatten(2)
    attention = torch.softmax(query.transpose(1, 2) @ key, dim=-1)  # no 1 / sqrt(d)
    expected = cfm.out((values @ attention.transpose(1, 2)).view(1, 8, 3, 4))
    torch.testing.assert_close(cfm(own, others), expected)


def test_official_traceback_shapes():
    stages = [torch.randn(1, 12, 2 ** k, 3 * 2 ** k) for k in (1, 2, 3, 4)]  # strides 32, 16, 8, 4
    fused = torch.randn(1, 12, 16, 48)
    traceback = OfficialTraceBack(12, 5, 4)
    final, head_inputs = traceback(fused, stages)
    assert final.shape == (1, 12, 16, 48)  # the last step, at the finest stage
    assert [tuple(x.shape[-2:]) for x in head_inputs] == [(4, 12), (8, 24)]  # steps on the 1/16 and 1/8 stages
    assert len(traceback.steps) == 3 and len(traceback.heads) == 2
    assert traceback.steps[-1].to_stage is None  # the last refined stage feature would be discarded
    assert [tuple(head(x).shape) for head, x in zip(traceback.heads, head_inputs, strict=True)] == [
        (1, 5, 4, 12), (1, 5, 8, 24)]
    final.sum().backward()
    assert stages[0].grad is None  # the coarsest (1/32) stage is not on the chain
    fused.requires_grad_()
    final, _ = traceback(fused, [s.detach().requires_grad_() for s in stages])
    assert torch.autograd.grad(final.sum(), fused)[0].abs().sum() > 0  # the CFM output enters step 0


def test_earlier_layouts_shapes():
    levels = [torch.randn(1, 8, 16 // s, 24 // s) for s in (1, 2, 4, 8)]
    stages, fused = TaskDecoder(8, 12, 4)(levels)
    assert [tuple(s.shape[-2:]) for s in stages] == [(2, 3), (4, 6), (8, 12), (16, 24)]
    assert fused.shape == (1, 12, 16, 24)
    for size in (None, 4, 64):
        for fusion in (BoundedFusion, OfficialFusion):
            cfm = fusion(12, 2, size)
            assert cfm(fused, [torch.randn_like(fused), torch.randn_like(fused)]).shape == fused.shape
    assert BoundedFusion(12, 0, 4)(fused, []).shape == fused.shape  # a single task: no auxiliary branch
    final, head_inputs = ResidualTraceBack(12, 3, 4)(fused, stages)
    assert final.shape == fused.shape and [tuple(x.shape) for x in head_inputs] == [(1, 12, 16, 24)] * 4


def test_bounded_attention_pools_keys_only():
    x = torch.randn(1, 8, 12, 16)
    assert key_grid(12, 16, 4) == (3, 4) and key_grid(3, 2, 4) == (3, 2)
    assert key_grid(120, 160, None) == (120, 160)
    # with a grid at least as large as the map, bounded and full attention coincide
    for fusion in (BoundedFusion, OfficialFusion):
        full, bounded = fusion(8, 1, None), fusion(8, 1, 16)
        if fusion is BoundedFusion:
            with torch.no_grad():
                full.gamma.fill_(1.0)  # starts at 0, which would hide the attention branch
        bounded.load_state_dict(full.state_dict())
        full.eval(), bounded.eval()
        other = torch.randn_like(x)
        torch.testing.assert_close(full(x, [other]), bounded(x, [other]))
        pooled = fusion(8, 1, 4).eval()
        pooled.load_state_dict(full.state_dict())
        assert not torch.allclose(pooled(x, [other]), full(x, [other]))


@pytest.mark.parametrize("layout", ["official", "residual"])
def test_every_stage_head_and_gate_gets_gradient(layout):
    model, tasks = _model("nyud", consistency_weight=0.1, traceback=layout)
    out = model(torch.randn(2, 3, 64, 64))
    loss = sum(raw.float().pow(2).mean() for raws in out["intermediate"].values() for raw in raws)
    loss.backward()
    for name in tasks:
        for head in model.traceback[name].heads:
            last = head[-1] if isinstance(head, torch.nn.Sequential) else head
            assert last.weight.grad is not None and last.weight.grad.abs().sum() > 0
        # intermediate losses reach the decoder and, through the fusion gates, the other tasks
        assert model.decoders[name].fuse[0].weight.grad.abs().sum() > 0
        assert all(gate.weight.grad.abs().sum() > 0 for gate in model.fusion[name].gates)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.backbone.parameters())


def test_official_cfm_needs_two_tasks_and_bounded_takes_one():
    info = DatasetInfo(name="toy", tasks=("depth",), num_classes={})
    config = Config()
    config.model.arch, config.model.backbone = "mtcp", "resnet-tiny"
    config.model.neck_channels = config.model.head_channels = 8
    with pytest.raises(ConfigError, match="mtcp.cfm"):
        build_model(config, info, build_tasks(["depth"], info))
    config.mtcp.cfm = "bounded"
    model = build_model(config, info, build_tasks(["depth"], info))
    assert model(torch.randn(2, 3, 64, 64))["pred"]["depth"].shape == (2, 1, 64, 64)


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


@pytest.mark.parametrize(
    ("override", "key"),
    [("mtcp.traceback_weight=.nan", "mtcp.traceback_weight"), ("mtcp.consistency_weight=-1", "mtcp.consistency_weight"),
     ("mtcp.attention_size=0", "mtcp.attention_size"), ("mtcp.cfm=gaaf", "mtcp.cfm"),
     ("mtcp.traceback=spf", "mtcp.traceback"), ("mtcp.deep_supervision=inside", "mtcp.deep_supervision"),
     ("contrastive.weight=.inf", "contrastive.weight"), ("contrastive.mining=hard", "contrastive.mining")],
)
def test_bad_method_settings_name_the_key(override, key):
    from densemtl.config import load_config

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])
