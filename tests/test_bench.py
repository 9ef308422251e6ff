"""The bench: parameter and FLOP attribution to tasks, and the JSON it writes."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from densemtl.config import load_config
from densemtl.engine.bench import dataset_info, run_bench, split_by_owner
from densemtl.models import build_model
from densemtl.tasks import build_tasks

TINY = [
    "model.backbone=resnet",
    "model.backbone_args={embedding_size: 8, hidden_sizes: [8, 16, 24, 32], depths: [1, 1, 1, 1], layer_type: basic}",
    "model.neck_channels=16",
    "model.head_channels=8",
    "data.synthetic.height=40",
    "data.synthetic.width=56",
    "data.eval_batch_size=2",
    "train.device=cpu",
]


def approx(value: float):
    return pytest.approx(value, rel=1e-6, abs=1e-9)


def flops_of(fn) -> float:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e9


def test_split_by_owner_counts_each_module_once() -> None:
    values = {
        "heads": 9.0,
        "heads.semseg": 4.0,
        "heads.semseg.body": 3.0,
        "networks.depth": 5.0,
        "networks.depth.heads.depth": 2.0,
        "backbone": 7.0,
    }
    assert split_by_owner(values, ["semseg", "depth"], nested=True) == {"semseg": 4.0, "depth": 5.0}
    params = {"heads.semseg.w": 2.0, "heads.semseg.b": 1.0, "networks.depth.heads.depth.w": 5.0, "neck.w": 3.0}
    assert split_by_owner(params, ["semseg", "depth"], nested=False) == {"semseg": 3.0, "depth": 5.0}


def test_bench_multitask_attribution_matches_the_parts(tmp_path) -> None:
    config = load_config(None, TINY)
    out = tmp_path / "bench.json"
    result = run_bench(config, out, repeats=2)
    assert json.loads(out.read_text()) == result
    assert result["latency_ms"] > 0 and result["throughput"]["images_per_s"] > 0

    info = dataset_info(config)
    model = build_model(config, info, build_tasks(config.data.tasks, info)).eval()
    image = torch.randn(1, 3, 40, 56)
    params, gflops = result["parameters"], result["gflops"]
    assert params["total"] == sum(p.numel() for p in model.parameters())
    assert params["backbone"] == sum(p.numel() for p in model.backbone.parameters()) > 0
    for name, head in model.heads.items():
        assert params["tasks"][name] == sum(p.numel() for p in head.parameters()) > 0
    shared = flops_of(lambda: model.neck(model.backbone(image)))
    assert gflops["shared"] == approx(shared) and shared > gflops["backbone"] > 0
    neck_out = model.neck(model.backbone(image))
    for name, head in model.heads.items():
        assert gflops["tasks"][name] == approx(flops_of(lambda h=head: h(neck_out, (40, 56))))
    assert gflops["total"] == approx(gflops["shared"] + sum(gflops["tasks"].values()))


def test_bench_single_task_models_share_nothing(tmp_path) -> None:
    result = run_bench(
        load_config(None, [*TINY, "model.arch=single", "data.tasks=[semseg,depth]"]), tmp_path / "b.json", 1
    )
    assert result["gflops"]["shared"] == approx(0.0)
    assert result["parameters"]["shared"] == 0
    assert result["gflops"]["tasks"]["semseg"] > result["gflops"]["backbone"] / 2 > 0


def test_bench_needs_no_data_to_build_a_model(tmp_path) -> None:
    """A NYUD-v2 config without data.root: the model is built from the dataset's facts alone."""
    config = load_config(None, [*TINY, "data.dataset=nyud", "data.tasks=[semseg,normals]", "data.crop_size=[32,40]"])
    assert config.data.root is None
    assert run_bench(config, tmp_path / "b.json", 1)["input_size"] == [32, 40]


def test_bench_checkpoint_measures_the_deployed_sharing_model(tmp_path, capsys) -> None:
    """bench --checkpoint counts what the sparse deployed form runs: evaluate's figure on the same images, below
    the dense sub-task networks (threshold 0); the cost table comes before any timing."""
    from densemtl.cli import main
    from densemtl.config import to_dict
    from densemtl.data.synthetic import synthetic_info
    from densemtl.engine.checkpoint import info_to_dict, save_checkpoint
    from densemtl.engine.evaluate import evaluate_checkpoint
    from tests.conftest import TINY as SHARING
    from tests.conftest import tiny_model

    data = [f"data.synthetic.cache_dir={tmp_path / 'cache'}", "data.synthetic.num_val=3", "data.eval_batch_size=1"]
    config = load_config(None, SHARING + data)
    checkpoint = save_checkpoint(tmp_path / "model.pt", {
        "config": to_dict(config), "info": info_to_dict(synthetic_info()), "model": tiny_model().state_dict()})
    assert main(["bench", "--checkpoint", str(checkpoint), "--images", "3", "--repeats", "1",
                 "--out", str(tmp_path / "bench.json")]) == 0
    out = capsys.readouterr().out
    assert out.index("GFLOPs per image as the deployed form (sharing) counted them") < out.index("latency")
    sparse = json.loads((tmp_path / "bench.json").read_text())["gflops"]["total"]
    evaluate_checkpoint(checkpoint, out=tmp_path / "e.json", tasks=["depth"])
    counted = json.loads((tmp_path / "e.json").read_text())["evaluation"]["sharing"]["gflops_per_image"]
    assert sparse == pytest.approx(counted, rel=1e-9)
    dense = run_bench(None, tmp_path / "d.json", 1, checkpoint=checkpoint, overrides=["sharing.threshold=0"], images=3)
    assert 0 < sparse < dense["gflops"]["total"]
    assert main(["bench", "configs/synthetic.yaml", "--checkpoint", str(checkpoint)]) == 2
    assert "bench takes a CONFIG or --checkpoint, not both" in capsys.readouterr().err
