"""Metrics against hand-computed values, batch-split invariance and the two-process gloo reduction."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from densemtl.config import EvalConfig, load_config
from densemtl.dataset_info import DatasetInfo
from densemtl.errors import ConfigError, DataError
from densemtl.metrics.base import CountMetric, Metric
from densemtl.metrics.boundary import BoundaryMetric
from densemtl.metrics.delta_m import delta_m, load_baselines, load_results
from densemtl.metrics.depth import DepthMetric
from densemtl.metrics.normals import NormalsMetric
from densemtl.metrics.saliency import SaliencyMetric
from densemtl.metrics.semseg import ConfusionMetric
from densemtl.registry import TASKS as TASK_TABLE
from densemtl.tasks import build_tasks


def test_confusion_known_ious() -> None:
    metric = ConfusionMetric(3, class_names=["a", "b", "c"])
    target = torch.tensor([[[0, 0, 1], [1, 2, 255]]])
    pred = torch.tensor([[[0, 1, 1], [1, 2, 0]]])
    metric.update(pred, target)
    # class 0: tp 1, fn 1 -> 1/2; class 1: tp 2, fp 1 -> 2/3; class 2: tp 1 -> 1; the ignored pixel counts nowhere
    np.testing.assert_allclose(metric.per_class_iou(), [50.0, 200 / 3, 100.0])
    result = metric.compute()
    assert result["mIoU"] == pytest.approx((50 + 200 / 3 + 100) / 3)
    assert result["pixel_acc"] == pytest.approx(80.0)
    assert "b" in metric.table() and "66.67" in metric.table()


def test_confusion_perfect_absent_class_and_reset() -> None:
    metric = ConfusionMetric(4)
    labels = torch.tensor([[[0, 1], [2, 2]]])
    metric.update(labels, labels)
    assert metric.compute() == {"mIoU": 100.0, "pixel_acc": 100.0}  # class 3 absent: not averaged in
    assert math.isnan(metric.per_class_iou()[3])
    metric.reset()
    assert int(metric.counts["confusion"].sum()) == 0


def test_confusion_rejects_out_of_range_prediction() -> None:
    metric = ConfusionMetric(3)
    with pytest.raises(ValueError, match="prediction label 7"):
        metric.update(torch.tensor([[[7]]]), torch.tensor([[[0]]]))


def test_depth_hand_computed() -> None:
    metric = DepthMetric()
    pred = torch.tensor([1.0, 2.0, 5.0]).reshape(1, 1, 1, 3)
    target = torch.tensor([1.0, 4.0, 0.0]).reshape(1, 1, 1, 3)  # the last pixel has no measurement
    metric.update(pred, target)
    result = metric.compute()
    assert result["rmse"] == pytest.approx(math.sqrt(2.0))
    assert result["abs_rel"] == pytest.approx(0.25)
    assert result["log10"] == pytest.approx(math.log10(2) / 2)
    # ratios 1 and 2: 2 > 1.25^3 = 1.953 so only the exact pixel is within every delta
    assert (result["delta1"], result["delta2"], result["delta3"]) == pytest.approx((50.0, 50.0, 50.0))


def test_negative_depth_is_clamped_before_every_figure() -> None:
    metric = DepthMetric()
    metric.update(torch.tensor([-3.0, 2.0]).reshape(1, 1, 1, 2), torch.tensor([1.0, 2.0]).reshape(1, 1, 1, 2))
    result = metric.compute()
    # the prediction counts as 1e-9 m (not -3 m): errors 1 - 1e-9 and 0
    assert result["rmse"] == pytest.approx(math.sqrt((1 - 1e-9) ** 2 / 2), rel=1e-12)
    assert result["abs_rel"] == pytest.approx((1 - 1e-9) / 2, rel=1e-12)
    assert result["log10"] == pytest.approx(9 / 2)
    assert result["delta3"] == pytest.approx(50.0)


def test_normals_hand_computed() -> None:
    metric = NormalsMetric()
    target = torch.tensor([[0, 0, 1], [0, 0, 1], [0, 0, 1], [0, 0, 0]], dtype=torch.float32)
    pred = torch.tensor([[0, 0, 3], [1, 0, 0], [2, 0, 2], [1, 0, 0]], dtype=torch.float32)  # 0, 90, 45 deg
    metric.update(pred.T.reshape(1, 3, 1, 4), target.T.reshape(1, 3, 1, 4))
    result = metric.compute()
    assert result["mean"] == pytest.approx(45.0, abs=1e-4)
    assert result["median"] == pytest.approx(45.0, abs=0.0051)  # 0.01-degree bins
    assert result["rmse"] == pytest.approx(math.sqrt((90**2 + 45**2) / 3), abs=1e-3)
    for key in ("11.25", "22.5", "30"):
        assert result[key] == pytest.approx(100 / 3)


def test_normals_median_matches_numpy() -> None:
    rng = np.random.default_rng(0)
    target = rng.normal(size=(1, 3, 20, 30)).astype(np.float32)
    pred = target + rng.normal(scale=0.4, size=target.shape).astype(np.float32)
    metric = NormalsMetric()
    metric.update(torch.from_numpy(pred), torch.from_numpy(target))
    p = pred.reshape(3, -1).T / np.linalg.norm(pred.reshape(3, -1).T, axis=1, keepdims=True)
    g = target.reshape(3, -1).T / np.linalg.norm(target.reshape(3, -1).T, axis=1, keepdims=True)
    angles = np.degrees(np.arccos(np.clip((p * g).sum(1), -1, 1)))
    assert metric.compute()["median"] == pytest.approx(np.median(angles), abs=0.0051)
    assert metric.compute()["mean"] == pytest.approx(angles.mean(), abs=1e-4)


def test_saliency_hand_computed() -> None:
    metric = SaliencyMetric(thresholds=19)
    pred = torch.tensor([0.92, 0.62, 0.32, 0.12, 0.99]).reshape(1, 1, 1, 5)
    target = torch.tensor([1.0, 0.0, 1.0, 0.0, 255.0]).reshape(1, 1, 1, 5)  # last pixel ignored
    metric.update(pred, target)
    result = metric.compute()
    # best threshold in (0.62, 0.92]: one pixel predicted, correct: P = 1, R = 0.5
    assert result["maxF"] == pytest.approx(100 * 1.3 * 0.5 / (0.3 + 0.5))
    # mIoU: p > t for t = 0.2, 0.25, .., 0.9; best at t < 0.32: {0.92, 0.62, 0.32} vs {0.92, 0.32}
    assert result["mIoU"] == pytest.approx(200 / 3)


def test_saliency_miou_is_the_best_mean_of_per_image_ious() -> None:
    metric = SaliencyMetric()
    pred = torch.tensor([[0.5, 0.5, 0.1, 0.1], [0.95, 0.0, 0.0, 0.0]]).reshape(2, 1, 1, 4)
    target = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]).reshape(2, 1, 1, 4)
    metric.update(pred, target)
    # t < 0.5: IoU 1 and 0 (a salient pixel where there is none); t >= 0.5: 0 and 0. Pooled counts would give 2/3.
    assert metric.compute()["mIoU"] == pytest.approx(50.0)
    empty = SaliencyMetric()
    empty.update(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2))
    assert empty.compute()["mIoU"] == pytest.approx(100.0)  # nothing salient in either: IoU 1


def test_saliency_miou_compares_single_precision_strictly() -> None:
    # 0.2 is a threshold; as float32 both are the same number, so "p > t" does not hold there (in double
    # precision float32(0.2) = 0.2000000030 would exceed 0.2 and the IoU at t = 0.2 would be 1)
    metric = SaliencyMetric()
    metric.update(torch.tensor([0.2, 0.1]).reshape(1, 1, 1, 2), torch.tensor([1.0, 0.0]).reshape(1, 1, 1, 2))
    assert metric.compute()["mIoU"] == 0.0


def _random_batch(rng: np.random.Generator, n: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    h, w = 24, 32
    seg_t = rng.integers(0, 5, size=(n, h, w))
    seg_t[rng.random((n, h, w)) < 0.1] = 255
    edge_t = np.zeros((n, 1, h, w), dtype=np.float32)
    edge_t[:, :, 8, 4:28] = 1
    edge_t[:, :, 4:20, 16] = 1
    edge_t[:, :, :, :2] = 255
    edge_p = np.clip(edge_t * 0.8 + rng.random((n, 1, h, w)) * 0.3, 0, 1) * (edge_t != 255)
    pairs = {
        "semseg": (rng.integers(0, 5, size=(n, h, w)), seg_t),
        "depth": (rng.uniform(0.5, 5, (n, 1, h, w)), rng.uniform(0, 5, (n, 1, h, w))),
        "normals": (rng.normal(size=(n, 3, h, w)), rng.normal(size=(n, 3, h, w))),
        "saliency": (rng.random((n, 1, h, w)), (rng.random((n, 1, h, w)) > 0.6) * 1.0),
        "edge": (edge_p.astype(np.float32), edge_t),
    }
    return {name: (torch.from_numpy(p), torch.from_numpy(t)) for name, (p, t) in pairs.items()}


def _metrics() -> dict[str, object]:
    return {
        "semseg": ConfusionMetric(5),
        "depth": DepthMetric(),
        "normals": NormalsMetric(),
        "saliency": SaliencyMetric(),
        "edge": BoundaryMetric(max_dist=0.05, thresholds=9),
    }


def _scores(batches: list[dict[str, tuple[torch.Tensor, torch.Tensor]]]) -> dict[str, dict[str, float]]:
    metrics = _metrics()
    for batch in batches:
        for name, (pred, target) in batch.items():
            metrics[name].update(pred, target)
    return {name: metric.compute() for name, metric in metrics.items()}


def _split(batch: dict, cuts: list[int]) -> list[dict]:
    bounds = [0, *cuts, next(iter(batch.values()))[0].shape[0]]
    ranges = zip(bounds, bounds[1:], strict=False)
    return [{name: (p[lo:hi], t[lo:hi]) for name, (p, t) in batch.items()} for lo, hi in ranges]


def test_batch_split_invariance() -> None:
    batch = _random_batch(np.random.default_rng(1), 5)
    whole = _scores([batch])
    pieces = _scores(_split(batch, [1, 3]))
    for name in whole:
        assert pieces[name] == pytest.approx(whole[name], rel=1e-12, abs=1e-12), name


def _gloo_worker(rank: int, init_file: str, out_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    batch = _random_batch(np.random.default_rng(2), 4)
    own = _split(batch, [2])[rank]
    metrics = _metrics()
    for name, (pred, target) in own.items():
        metrics[name].update(pred, target)
    for metric in metrics.values():
        metric.sync()
    if rank == 0:
        with open(out_file, "w") as stream:
            json.dump({name: metric.compute() for name, metric in metrics.items()}, stream)
    dist.destroy_process_group()


def test_two_process_gloo_reduction(tmp_path) -> None:
    out_file = tmp_path / "reduced.json"
    mp.spawn(_gloo_worker, args=(str(tmp_path / "init"), str(out_file)), nprocs=2, join=True)
    reduced = json.loads(out_file.read_text())
    single = _scores([_random_batch(np.random.default_rng(2), 4)])
    for name in single:
        assert reduced[name] == pytest.approx(single[name], rel=1e-9, abs=1e-9), name


def test_every_task_metric_is_a_metric_whose_reset_restores_its_declared_zeros() -> None:
    info = DatasetInfo("toy", tuple(TASK_TABLE), num_classes={"semseg": 5, "human_parts": 2})
    batch = _random_batch(np.random.default_rng(3), 2)
    for name in TASK_TABLE:
        metric = build_tasks([name], info)[name].build_metric(info, EvalConfig(boundary_thresholds=5))
        assert isinstance(metric, Metric) and isinstance(metric, CountMetric), name
        zeros = {key: value.clone() for key, value in metric.counts.items()}
        assert zeros and not any(value.any() for value in zeros.values())
        if name in batch:
            metric.update(*batch[name])
            assert any(value.any() for value in metric.counts.values()), name
        metric.reset()
        assert metric.counts.keys() == zeros.keys()
        for key, value in metric.counts.items():
            assert value.dtype == zeros[key].dtype and value.equal(zeros[key]), (name, key)


def test_a_metric_declares_its_counts_and_sums_them() -> None:
    class PixelCount(CountMetric):
        def __init__(self) -> None:
            super().__init__()
            self.add_state("pixels", torch.zeros((), dtype=torch.int64))

        def update(self, pred, target) -> None:
            self.add("pixels", np.asarray(target).size)

        def compute(self) -> dict[str, float]:
            return {"pixels": float(self.counts["pixels"])}

    metric = PixelCount()
    for _ in range(3):
        metric.update(None, np.zeros((2, 4)))
    metric.sync()  # outside torch.distributed: nothing to combine
    assert metric.compute() == {"pixels": 24.0} and "24.0000" in metric.table()
    metric.reset()
    assert metric.compute() == {"pixels": 0.0}


def test_delta_m_sign_convention(tmp_path) -> None:
    results = {"semseg": {"mIoU": 44.0}, "depth": {"rmse": 0.45}}
    baselines = {"semseg": {"mIoU": 40.0}, "depth": {"rmse": 0.5}}
    # +10% mIoU (higher is better) and -10% RMSE (lower is better): both improvements
    assert delta_m(results, baselines) == pytest.approx(10.0)
    assert delta_m({"depth": {"rmse": 0.55}}, baselines, ["depth"]) == pytest.approx(-10.0)
    for task, name in (("semseg", "seg.json"), ("depth", "depth.json")):
        (tmp_path / name).write_text(json.dumps({"results": {task: baselines[task]}, "step": 10}))
    assert load_baselines([tmp_path / "seg.json", tmp_path / "depth.json"]) == baselines
    (tmp_path / "bad.json").write_text(json.dumps({"semseg": 1}))
    with pytest.raises(DataError, match="bad.json"):
        load_results(tmp_path / "bad.json")
    with pytest.raises(DataError, match="no 'rmse' for task 'depth'"):
        delta_m(results, {"semseg": {"mIoU": 40.0}})


def test_delta_m_takes_saliency_maxf_or_miou() -> None:
    results = {"saliency": {"maxF": 88.0, "mIoU": 60.0}}
    baselines = {"saliency": {"maxF": 80.0, "mIoU": 75.0}}
    assert delta_m(results, baselines) == pytest.approx(10.0)  # maxF by default
    assert delta_m(results, baselines, eval_config=EvalConfig()) == pytest.approx(10.0)
    assert delta_m(results, baselines, eval_config=EvalConfig(delta_m_saliency="mIoU")) == pytest.approx(-20.0)
    with pytest.raises(ConfigError, match="eval.delta_m_saliency"):
        load_config(None, ["eval.delta_m_saliency=F"])
