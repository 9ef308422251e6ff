"""densemtl evaluate: a model on padded batches, a checkpoint, and predictions saved on disk."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage
from torch import nn

from densemtl.cli import main
from densemtl.config import DataConfig, load_config, to_dict
from densemtl.data import build_dataset
from densemtl.dataset_info import DatasetInfo
from densemtl.engine.checkpoint import info_to_dict, save_checkpoint
from densemtl.engine.evaluate import (
    _check_prediction,
    build_metrics,
    compute_all,
    evaluate_checkpoint,
    evaluate_model,
    evaluate_predictions,
    run_metrics,
)
from densemtl.errors import DataError, UserError
from densemtl.metrics.delta_m import load_results
from densemtl.models import build_model
from densemtl.tasks import build_tasks
from tests.conftest import tiny_config
from tests.dataset_fixtures import NYUD_LAYOUTS, write_nyud, write_pascal

TASKS = ["semseg", "depth", "normals", "edge"]


class PixelModel(nn.Module):
    """A per-pixel model (1x1 convolutions): its prediction at a pixel ignores padding elsewhere."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.heads = nn.ModuleDict(
            {"semseg": nn.Conv2d(3, num_classes, 1), "depth": nn.Conv2d(3, 1, 1), "edge": nn.Conv2d(3, 1, 1)}
        )

    def forward(self, image: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
        return {"pred": {name: head(image) for name, head in self.heads.items()}}


class VariedSizes(torch.utils.data.Dataset):
    """Samples of three different sizes, so evaluation batches are padded."""

    info = DatasetInfo(name="toy", tasks=("semseg", "depth", "edge"), num_classes={"semseg": 4})

    def __init__(self) -> None:
        rng = np.random.default_rng(0)
        self.samples = []
        for index, (h, w) in enumerate([(20, 30), (26, 22), (18, 34)]):
            edge = np.zeros((1, h, w), dtype=np.float32)
            edge[0, h // 2, 3:-3] = 1
            self.samples.append({
                "image": torch.from_numpy(rng.normal(size=(3, h, w)).astype(np.float32)),
                "semseg": torch.from_numpy(rng.integers(0, 4, size=(h, w))),
                "depth": torch.from_numpy(rng.uniform(0.5, 4, size=(1, h, w)).astype(np.float32)),
                "edge": torch.from_numpy(edge),
                "meta": {"name": f"s{index}", "size": (h, w)},
            })

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        return self.samples[index]


def test_evaluate_model_crops_padded_batches_back() -> None:
    dataset = VariedSizes()
    config = load_config(None, ["data.eval_batch_size=3", "data.tasks=[semseg,depth,edge]"])
    tasks = build_tasks(["semseg", "depth", "edge"], dataset.info)
    model = PixelModel(4)
    results = evaluate_model(model, dataset, tasks, config, include_boundary=True)
    expected = build_metrics(tasks, dataset.info, config.eval)
    with torch.no_grad():
        for sample in dataset:  # one image at a time: no padding at all
            raw = model(sample["image"][None])["pred"]
            for name, metric in expected.items():
                metric.update(tasks[name].predict(raw[name]), sample[name][None])
    # equal up to float summation order (which varies with the thread count)
    for name, metric in expected.items():
        assert results[name] == pytest.approx(metric.compute(), rel=1e-7), name
    assert "edge" not in evaluate_model(model, dataset, tasks, config, include_boundary=False)


def _sharded_worker(rank: int, init_file: str, out_file: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    dataset = VariedSizes()
    config = load_config(None, ["data.eval_batch_size=2", "data.tasks=[semseg,depth,edge]"])
    tasks = build_tasks(["semseg", "depth", "edge"], dataset.info)
    metrics = build_metrics(tasks, dataset.info, config.eval)
    run_metrics(PixelModel(4), dataset, tasks, metrics, config, "cpu")
    results = compute_all(metrics)
    if rank == 0:  # the summed counts must cover every pixel of the split exactly once
        results["pixels"] = int(metrics["semseg"].counts["confusion"].sum())
        Path(out_file).write_text(json.dumps(results))
    torch.distributed.destroy_process_group()


def test_evaluate_model_shards_the_split_over_two_processes(tmp_path: Path) -> None:
    out_file = tmp_path / "results.json"
    torch.multiprocessing.spawn(_sharded_worker, args=(str(tmp_path / "init"), str(out_file)), nprocs=2, join=True)
    dataset = VariedSizes()
    config = load_config(None, ["data.eval_batch_size=3", "data.tasks=[semseg,depth,edge]"])
    single = evaluate_model(PixelModel(4), dataset, build_tasks(["semseg", "depth", "edge"], dataset.info), config,
                            include_boundary=True)
    reduced = json.loads(out_file.read_text())
    assert reduced.pop("pixels") == sum(sample["semseg"].numel() for sample in dataset.samples)
    for name in single:
        assert reduced[name] == pytest.approx(single[name], rel=1e-7), name


def _save_predictions(pred_dir: Path, tasks: dict, frames: dict[str, dict[str, np.ndarray]]) -> None:
    for name, task in tasks.items():
        (pred_dir / name).mkdir(parents=True, exist_ok=True)
        for image_name, frame in frames.items():
            value = frame[name]
            task.save(torch.from_numpy(value if name != "depth" else value[None]), pred_dir / name / image_name)


@pytest.mark.parametrize("layout", NYUD_LAYOUTS)
def test_saved_predictions_round_trip_on_nyud_layouts(tmp_path: Path, layout: str) -> None:
    expected = write_nyud(tmp_path / "nyud", layout=layout, splits={"train": 1, "val": 2})
    info = build_dataset(load_config(None, [f"data.root={tmp_path / 'nyud'}", "data.dataset=nyud"]).data,
                         "val", train=False).info
    tasks = build_tasks(TASKS, info)
    frames = {name: {**frame, "semseg": np.where(frame["semseg"] == 255, 0, frame["semseg"])}
              for name, frame in expected["val"].items()}
    _save_predictions(tmp_path / "pred", tasks, frames)
    out = tmp_path / "scores.json"
    results = evaluate_predictions(tmp_path / "pred", "nyud", tmp_path / "nyud", split="val", out=out, per_class=True)
    assert results["semseg"]["mIoU"] == pytest.approx(100.0)
    assert results["depth"]["rmse"] == pytest.approx(0.0, abs=1e-6)
    assert results["normals"]["mean"] < 0.5  # PNG round trip of unit vectors
    assert set(results["edge"]) == {"odsF", "oisF", "AP"}
    written = json.loads(out.read_text())
    assert load_results(out) == results
    assert len(written["per_class"]["semseg"]) == 40


def test_saved_predictions_round_trip_on_pascal(tmp_path: Path) -> None:
    write_pascal(tmp_path / "pascal", splits={"train": 1, "val": 2})
    names = ["semseg", "human_parts", "saliency", "normals", "edge"]
    data = DataConfig(dataset="pascal", root=str(tmp_path / "pascal"), tasks=names)
    ground_truth = build_dataset(data, "val", train=False)
    tasks = build_tasks(names, ground_truth.info)
    for index in range(len(ground_truth)):  # the ground truth itself, ignore labels replaced by valid values
        sample = ground_truth[index]
        for name, task in tasks.items():
            value = sample[name]
            if name != "normals":
                value = torch.where(value == 255, torch.zeros_like(value), value)
            (tmp_path / "pred" / name).mkdir(parents=True, exist_ok=True)
            task.save(value, tmp_path / "pred" / name / sample["meta"]["name"])
    results = evaluate_predictions(tmp_path / "pred", "pascal", tmp_path / "pascal", split="val")
    assert results["semseg"]["mIoU"] == pytest.approx(100.0)
    assert results["human_parts"]["mIoU"] == pytest.approx(100.0)
    assert results["saliency"]["maxF"] == pytest.approx(100.0)
    assert results["normals"]["mean"] < 0.5
    assert 0.0 <= results["edge"]["odsF"] <= 100.0


def test_bad_prediction_files_are_named(tmp_path: Path) -> None:
    expected = write_nyud(tmp_path / "nyud", layout="NYUDv2", splits={"train": 1, "val": 3})
    names = sorted(expected["val"])
    pred = tmp_path / "pred" / "semseg"
    pred.mkdir(parents=True)
    Image.fromarray(np.zeros((24, 32), np.uint8)).save(pred / f"{names[0]}.png")
    Image.fromarray(np.full((24, 32), 45, np.uint8)).save(pred / f"{names[1]}.png")  # NYUD has 40 classes
    with pytest.raises(DataError, match="label 45 out of range 0..39") as error:
        evaluate_predictions(tmp_path / "pred", "nyud", tmp_path / "nyud", split="val")
    assert names[1] in str(error.value)
    Image.fromarray(np.zeros((20, 32), np.uint8)).save(pred / f"{names[1]}.png")  # wrong size
    with pytest.raises(DataError) as error:
        evaluate_predictions(tmp_path / "pred", "nyud", tmp_path / "nyud", split="val", report_all=True)
    message = str(error.value)
    assert "2 bad prediction file(s)" in message
    assert f"{names[1]}.png: prediction size (20, 32), ground truth (24, 32)" in message
    assert f"no semseg prediction for '{names[2]}'" in message
    with pytest.raises(DataError, match="no sub-folder"):
        evaluate_predictions(tmp_path / "pred", "nyud", tmp_path / "nyud", tasks=["depth"])


def test_checkpoint_and_saved_predictions_agree(tmp_path: Path) -> None:
    config = load_config(None, [
        "data.synthetic.height=32", "data.synthetic.width=48", "data.synthetic.num_train=2",
        "data.synthetic.num_val=3", f"data.synthetic.cache_dir={tmp_path / 'cache'}", "data.tasks=[semseg,depth]",
        "model.backbone=resnet-tiny", "model.neck_channels=16", "model.head_channels=16", "train.device=cpu",
    ])
    dataset = build_dataset(config.data, "val", train=False)
    tasks = build_tasks(config.data.tasks, dataset.info)
    torch.manual_seed(0)
    model = build_model(config, dataset.info, tasks)
    checkpoint = save_checkpoint(tmp_path / "model.pt", {
        "config": to_dict(config), "info": info_to_dict(dataset.info), "model": model.state_dict(), "ema": None,
    })
    from_checkpoint = evaluate_checkpoint(checkpoint, split="val", out=tmp_path / "ckpt.json")
    assert from_checkpoint == evaluate_model(model, dataset, tasks, config)
    assert load_results(tmp_path / "ckpt.json") == from_checkpoint
    with pytest.raises(UserError, match="weights do not fit"):  # overrides reach the rebuilt model
        evaluate_checkpoint(checkpoint, overrides=["model.head_channels=8"], split="val")
    # the same model's predictions written to disk score the same (class ids and float depth are lossless)
    with torch.no_grad():
        for index in range(len(dataset)):
            sample = dataset[index]
            raw = model.eval()(sample["image"][None])["pred"]
            for name, task in tasks.items():
                (tmp_path / "pred" / name).mkdir(parents=True, exist_ok=True)
                task.save(task.predict(raw[name])[0], tmp_path / "pred" / name / sample["meta"]["name"])
    from_disk = evaluate_predictions(tmp_path / "pred", "synthetic", None, split="val", synthetic=config.data.synthetic)
    for name in tasks:
        assert from_disk[name] == pytest.approx(from_checkpoint[name], rel=1e-6), name


def test_non_finite_predictions_are_named_per_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """NaN or infinity in any task's prediction, class maps read as floats included, is one line per file."""
    expected = write_nyud(tmp_path / "nyud", layout="NYUD_MT", splits={"train": 1, "val": 3})
    names = sorted(expected["val"])
    semseg = build_tasks(["semseg"], DatasetInfo("toy", ("semseg",), num_classes={"semseg": 40}))["semseg"]
    target = torch.zeros(24, 32, dtype=torch.long)
    for value in (float("nan"), float("inf")):
        labels = torch.zeros(24, 32)
        labels[2, 3] = value
        problem = _check_prediction(semseg, Path("other/semseg/a.npy"), labels, target)
        assert problem == "other/semseg/a.npy: holds NaN or infinite values (1 of 768)"
    for index, name in enumerate(names):
        depth = expected["val"][name]["depth"].copy()
        normals = expected["val"][name]["normals"].transpose(1, 2, 0).copy()
        if index < 2:
            (depth if index == 0 else normals)[5, 6] = np.nan
        for task, array in (("depth", depth), ("normals", normals)):
            (tmp_path / "pred" / task).mkdir(parents=True, exist_ok=True)
            np.save(tmp_path / "pred" / task / f"{name}.npy", array.astype(np.float32))
    argv = ["evaluate", "--predictions", str(tmp_path / "pred"), "--dataset", "nyud", "--root", str(tmp_path / "nyud")]
    assert main([*argv, "--all-errors"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "2 bad prediction file(s)" in err
    assert f"depth/{names[0]}.npy: holds NaN or infinite values (1 of 768)" in err
    assert f"normals/{names[1]}.npy: holds NaN or infinite values (3 of 2304)" in err
    assert main(argv) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if "densemtl: error" in line]
    assert lines == [f"densemtl: error: {tmp_path}/pred/depth/{names[0]}.npy: holds NaN or infinite values (1 of 768)"]


def _noisy_predictions(root: Path, expected: dict, seed: int = 0) -> None:
    """Imperfect predictions of every NYUD task (a few negative depths, blurred noisy boundary maps)."""
    rng = np.random.default_rng(seed)
    info = build_dataset(DataConfig(dataset="nyud", root=str(root / "nyud"), tasks=TASKS), "val", train=False).info
    tasks = build_tasks(TASKS, info)
    for image_name, frame in expected["val"].items():
        shape = frame["semseg"].shape
        edge = np.clip(ndimage.gaussian_filter(frame["edge"], 1.0) * 2 + 0.2 * rng.random(shape), 0, 1)
        values = {
            "semseg": np.where(rng.random(shape) < 0.7, np.where(frame["semseg"] == 255, 0, frame["semseg"]),
                               rng.integers(0, 40, size=shape)),
            "depth": (frame["depth"] + rng.normal(scale=0.3, size=shape))[None].astype(np.float32),
            "normals": frame["normals"] + rng.normal(scale=0.2, size=frame["normals"].shape).astype(np.float32),
            "edge": edge.astype(np.float32),
        }
        for name, task in tasks.items():
            (root / "pred" / name).mkdir(parents=True, exist_ok=True)
            task.save(torch.from_numpy(values[name]), root / "pred" / name / image_name)


def test_worker_processes_give_the_same_figures(tmp_path: Path) -> None:
    expected = write_nyud(tmp_path / "nyud", layout="NYUDv2", splits={"train": 1, "val": 5})
    _noisy_predictions(tmp_path, expected)
    runs = {
        (protocol, workers): evaluate_predictions(tmp_path / "pred", "nyud", tmp_path / "nyud", split="val",
                                                  edge_protocol=protocol, workers=workers)
        for protocol in ("seism-hed", "invpt") for workers in (1, 2)
    }
    for protocol in ("seism-hed", "invpt"):
        assert runs[protocol, 1] == runs[protocol, 2]  # identical, not just close
    assert runs["seism-hed", 1]["edge"] != runs["invpt", 1]["edge"]
    assert 0 < runs["seism-hed", 1]["edge"]["odsF"] < 100
    with pytest.raises(UserError, match="--workers must be at least 1"):
        evaluate_predictions(tmp_path / "pred", "nyud", tmp_path / "nyud", split="val", workers=0)


def test_command_line_chooses_the_edge_protocol_and_workers(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from densemtl.cli import main

    expected = write_nyud(tmp_path / "nyud", layout="NYUDv2", splits={"train": 1, "val": 2})
    _noisy_predictions(tmp_path, expected)
    common = ["evaluate", "--predictions", str(tmp_path / "pred"), "--dataset", "nyud",
              "--root", str(tmp_path / "nyud")]
    assert main([*common, "--edge-protocol", "mtlpt", "--workers", "2", "--out", str(tmp_path / "m.json")]) == 0
    written = json.loads((tmp_path / "m.json").read_text())
    assert written["evaluation"]["eval"]["edge_protocol"] == "mtlpt"
    assert written["results"] == evaluate_predictions(tmp_path / "pred", "nyud", tmp_path / "nyud",
                                                      edge_protocol="mtlpt", workers=1)
    capsys.readouterr()
    assert main([*common, "--workers", "0"]) == 2
    assert capsys.readouterr().err.strip() == "densemtl: error: --workers must be at least 1, got 0"


def test_checkpoint_evaluation_uses_the_full_protocol_and_chosen_tasks(tmp_path: Path, capsys) -> None:
    """Training's quicker 5 thresholds are not evaluate's: it scores the protocol's 99 unless told; --tasks."""
    config = tiny_config(tmp_path, "data.tasks=[semseg,edge]", "eval.boundary_thresholds=5", "data.synthetic.num_val=2")
    dataset = build_dataset(config.data, "val", train=False)
    tasks = build_tasks(config.data.tasks, dataset.info)
    torch.manual_seed(0)
    model = build_model(config, dataset.info, tasks)
    run = tmp_path / "run"
    checkpoint = save_checkpoint(run / "checkpoints" / "best.pt", {
        "config": to_dict(config), "info": info_to_dict(dataset.info), "model": model.state_dict(), "ema": None,
    })
    assert main(["evaluate", "--checkpoint", str(checkpoint)]) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[0]
    assert header.startswith(f"evaluating {checkpoint} on synthetic split 'val' (32x48); edge: edge_protocol "
                             "seism-hed, thresholds 99, matcher exact, max_dist ")
    assert out.strip().endswith(f"figures written to {run / 'evaluation_val.json'}")
    written = json.loads((run / "evaluation_val.json").read_text())
    assert written["protocol"]["metrics"]["edge"]["thresholds"] == 99 and set(written["results"]) == {"semseg", "edge"}
    quick = tmp_path / "quick.json"
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--tasks", "edge", "eval.boundary_thresholds=5",
                 "--out", str(quick)]) == 0
    written = json.loads(quick.read_text())
    assert written["protocol"]["metrics"]["edge"]["thresholds"] == 5 and set(written["results"]) == {"edge"}
    assert written["results"]["edge"] == pytest.approx(evaluate_model(model, dataset, tasks, config)["edge"])
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--tasks", "depth"]) == 2
    assert "the model has no task 'depth' (its tasks: semseg, edge)" in capsys.readouterr().err
