"""Partial labels: a sample may lack any task's label; the loss is masked per sample, metrics skip it,
``data check`` reports coverage, and training still learns a task with half its labels dropped."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset, Subset

from densemtl.cli import main
from densemtl.config import DataConfig, LossConfig, load_config
from densemtl.data import build_dataset
from densemtl.data.base import collate, labelled_mask
from densemtl.data.check import check_dataset
from densemtl.data.transforms import JointTransform, to_tensor_sample
from densemtl.dataset_info import DatasetInfo
from densemtl.engine.evaluate import evaluate_model
from densemtl.engine.objective import Objective
from densemtl.errors import ConfigError, DataError
from densemtl.losses.balancers import build_balancer
from densemtl.registry import BALANCERS
from densemtl.tasks import DepthTask, NormalsTask, SemsegTask, build_tasks
from tests.conftest import GroupNormNet, make_trainer, tiny_config
from tests.dataset_fixtures import write_nyud

TASKS = ["semseg", "depth", "normals"]


def _raw(depth: bool, rng: np.random.Generator) -> dict:
    return {
        "image": rng.integers(0, 255, (12, 16, 3), dtype=np.uint8),
        "semseg": rng.integers(0, 3, (12, 16)),
        "depth": rng.uniform(1, 3, (12, 16)).astype(np.float32) if depth else None,
        "normals": np.tile(np.array([0.0, 0.0, 1.0], np.float32)[:, None, None], (1, 12, 16)),
        "meta": {"name": f"d{int(depth)}"},
    }


def test_a_missing_label_travels_as_an_invalid_target_and_a_mask():
    rng = np.random.default_rng(0)
    transform = JointTransform(crop_size=(10, 12), scale_range=(1.0, 1.5), flip=True)
    torch.manual_seed(0)
    samples = [transform(_raw(depth=False, rng=rng), 0), transform(_raw(depth=True, rng=rng), 1)]
    assert samples[0]["meta"]["missing"] == ("depth",) and "missing" not in samples[1]["meta"]
    assert samples[0]["depth"].shape == (1, 10, 12) and not samples[0]["depth"].any()  # 0 = no measurement
    assert to_tensor_sample(_raw(depth=False, rng=rng))["depth"].shape == (1, 12, 16)
    batch = collate(samples)
    assert labelled_mask(batch, "depth").tolist() == [False, True]
    assert labelled_mask(batch, "semseg") is None
    assert (SemsegTask.empty_target((2, 3)) == 255).all() and SemsegTask.empty_target((2, 3)).dtype == torch.long
    assert NormalsTask.empty_target((2, 3)).shape == (3, 2, 3) and not NormalsTask.empty_target((2, 3)).any()


def test_synthetic_scenes_drop_an_exact_share_of_training_labels(tmp_path):
    config = tiny_config(tmp_path, "data.synthetic.drop_labels={depth: 0.5, semseg: 0.25}")
    train = build_dataset(config.data, "train", train=True)
    missing = [train[i]["meta"].get("missing", ()) for i in range(len(train))]
    assert sum("depth" in m for m in missing) == 6 and sum("semseg" in m for m in missing) == 3  # of 12 frames
    again = build_dataset(config.data, "train", train=True)
    assert [again[i]["meta"].get("missing", ()) for i in range(len(again))] == missing  # same frames
    val = build_dataset(config.data, "val", train=False)
    assert all("missing" not in val[i]["meta"] for i in range(len(val)))  # evaluation keeps every label
    with pytest.raises(Exception, match="drop_labels.saliency"):
        tiny_config(tmp_path, "data.synthetic.drop_labels={saliency: 0.5}")


def _objective(balancer: str) -> tuple[Objective, dict]:
    info = DatasetInfo(name="toy", tasks=tuple(TASKS), num_classes={"semseg": 3})
    tasks = build_tasks(TASKS, info)
    return Objective(tasks, build_balancer(LossConfig(balancer=balancer), TASKS)), tasks


def _batch(labelled_depth: list[bool]) -> tuple[dict, dict]:
    torch.manual_seed(0)
    size = len(labelled_depth)
    batch = {
        "semseg": torch.randint(0, 3, (size, 8, 8)),
        "depth": torch.rand(size, 1, 8, 8) + 0.5,
        "normals": torch.nn.functional.normalize(torch.randn(size, 3, 8, 8), dim=1),
        "meta": [{"name": str(i), **({} if ok else {"missing": ("depth",)})} for i, ok in enumerate(labelled_depth)],
    }
    for index, ok in enumerate(labelled_depth):
        if not ok:
            batch["depth"][index] = 0.0
    pred = {"semseg": torch.randn(size, 3, 8, 8, requires_grad=True), "depth": torch.randn(size, 1, 8, 8,
            requires_grad=True), "normals": torch.randn(size, 3, 8, 8, requires_grad=True)}
    return batch, pred


@pytest.mark.parametrize("balancer", sorted(BALANCERS))
def test_the_loss_is_the_mean_over_labelled_samples_and_a_batch_without_any_is_harmless(balancer):
    objective, tasks = _objective(balancer)
    batch, pred = _batch([True, False, True, False])
    losses, _ = objective.task_losses({"pred": pred}, batch)
    keep = torch.tensor([True, False, True, False])
    torch.testing.assert_close(losses["depth"], tasks["depth"].loss(pred["depth"][keep], batch["depth"][keep]))
    torch.testing.assert_close(losses["semseg"], tasks["semseg"].loss(pred["semseg"], batch["semseg"]))

    batch, pred = _batch([False, False])  # no depth label in the whole batch
    shared = [torch.nn.Parameter(torch.ones(1))]
    output = {"pred": {t: p * shared[0] for t, p in pred.items()}}
    for step in range(3):  # windows close, weights update: nothing may divide by zero
        total, figures = objective(output, batch, step, shared)
        assert torch.isfinite(total) and "loss/depth" not in figures
        total.backward(retain_graph=True)
    assert torch.equal(pred["depth"].grad, torch.zeros_like(pred["depth"]))  # in the graph, zero gradient
    assert pred["semseg"].grad.abs().sum() > 0
    assert all(torch.isfinite(p).all() for p in objective.balancer.state_dict().values() if p.is_floating_point())


def test_window_means_and_uncertainty_ignore_steps_without_a_label():
    dwa = build_balancer(LossConfig(balancer="dwa", balancer_args={"window": 2}), ["semseg", "depth"])
    dwa.base.fill_(1.0)
    dwa.combine({"semseg": torch.tensor(2.0), "depth": torch.tensor(4.0)}, 0)
    dwa.combine({"semseg": torch.tensor(2.0)}, 1)  # depth unlabelled: not a zero in its mean
    dwa.combine({"semseg": torch.tensor(1.0), "depth": torch.tensor(1.0)}, 2)
    assert dwa.history[1].tolist() == [2.0, 4.0]
    old = dwa.state_dict()
    old["window_count"] = torch.tensor(2.0, dtype=torch.float64)  # a checkpoint from before partial labels
    dwa.load_state_dict(old)
    assert dwa.window_count.tolist() == [2.0, 2.0]
    uncertainty = build_balancer(LossConfig(balancer="uncertainty"), ["semseg", "depth"])
    total, _ = uncertainty.combine({"semseg": torch.tensor(2.0)}, 0)
    total.backward()
    assert uncertainty.log_vars.grad[1] == 0  # no pull on an unlabelled task's variance


def _depth_rmse(trainer, config) -> float:
    data = build_dataset(config.data, "val", train=False)
    return evaluate_model(trainer.model, data, trainer.tasks, config, include_boundary=False)["depth"]["rmse"]


@pytest.mark.parametrize("balancer", ["fixed", "mgda"])
def test_training_with_half_the_depth_labels_still_learns_depth(tmp_path, balancer):
    common = ["data.tasks=[semseg,depth]", "data.batch_size=2", "train.lr=2e-2", "train.warmup_steps=0",
              "train.steps=40", "train.schedule=constant", f"loss.balancer={balancer}"]
    rmse = {}
    for fraction in (0.5, 1.0):
        config = tiny_config(tmp_path, *common, f"data.synthetic.drop_labels={{depth: {fraction}}}")
        trainer = make_trainer(config, tmp_path / str(fraction), GroupNormNet)
        initial = _depth_rmse(trainer, config)
        steps = [trainer.train_step() for _ in range(40)]
        assert all(torch.isfinite(torch.as_tensor(s["loss/total"])) for s in steps)
        without = sum("loss/depth" not in s for s in steps)
        rmse[fraction] = _depth_rmse(trainer, config)
        if fraction == 0.5:
            assert 0 < without < len(steps)  # some batches had no depth label at all, others had
    assert rmse[0.5] < 0.75 * initial, (rmse, initial)  # learned from the labelled half
    assert rmse[0.5] < 0.75 * rmse[1.0], rmse  # far better than the same run without any depth label


class MissingDepth(Dataset):
    """A split where sample ``index`` has no depth label."""

    def __init__(self, base: Dataset, index: int) -> None:
        self.base, self.index, self.info = base, index, base.info

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict:
        sample = dict(self.base[index])
        if index == self.index:
            sample["depth"] = DepthTask.empty_target(tuple(sample["depth"].shape[-2:]))
            sample["meta"] = {**sample["meta"], "missing": ("depth",)}
        return sample


def test_metrics_skip_a_sample_without_the_label(tmp_path):
    config = tiny_config(tmp_path, "data.tasks=[semseg,depth]", "data.eval_batch_size=4")
    trainer = make_trainer(config)
    base = build_dataset(config.data, "val", train=False)
    model, tasks = trainer.model, trainer.tasks
    partial = evaluate_model(model, MissingDepth(base, 1), tasks, config, include_boundary=False)
    full = evaluate_model(model, base, tasks, config, include_boundary=False)
    others = evaluate_model(model, _subset(base, [0, 2, 3]), tasks, config, include_boundary=False)
    assert partial["semseg"] == pytest.approx(full["semseg"])
    assert partial["depth"] == pytest.approx(others["depth"]) and partial["depth"] != pytest.approx(full["depth"])


def _subset(base: Dataset, indices: list[int]) -> Subset:
    """A Subset that keeps the dataset's ``info``."""
    subset = Subset(base, indices)
    subset.info = base.info
    return subset


def test_a_folder_dataset_declared_partial_keeps_samples_without_a_task_file(tmp_path, capsys):
    expected = write_nyud(tmp_path, layout="NYUD_MT", splits={"train": 4, "val": 2})
    (tmp_path / "depth" / "train_001.npy").unlink()
    data = DataConfig(dataset="nyud", root=str(tmp_path), tasks=["semseg", "depth"])
    with pytest.raises(DataError, match="train_001.npy"):
        build_dataset(data, "train", train=False)
    data.partial_labels = True
    train = build_dataset(data, "train", train=False)
    assert len(train) == 4
    sample = train[train.names.index("train_001")]
    assert sample["meta"]["missing"] == ("depth",) and not sample["depth"].any()
    np.testing.assert_array_equal(sample["semseg"].numpy(), expected["train"]["train_001"]["semseg"])
    assert check_dataset(tmp_path) != []  # undeclared: a missing file is a problem
    capsys.readouterr()
    assert check_dataset(tmp_path, partial=True) == []
    out = capsys.readouterr().out
    assert "coverage train: semseg 100.0% (4/4), depth 75.0% (3/4)" in out
    assert main(["data", "check", str(tmp_path), "--partial"]) == 0
    (tmp_path / "images" / "train_002.jpg").unlink()  # an image is never optional
    assert any("train_002" in problem for problem in check_dataset(tmp_path, partial=True))


@pytest.mark.parametrize("value, why", [(".nan", r"must be in \[0, 1\], got nan"), ("1.5", r"must be in \[0, 1\]"),
                                        ("-0.1", r"must be in \[0, 1\]")])
def test_dropped_fractions_are_checked(value, why):
    with pytest.raises(ConfigError, match=rf"'data.synthetic.drop_labels.depth': {why}"):
        load_config(None, [f"data.synthetic.drop_labels={{depth: {value}}}"])


def test_dropped_labels_name_a_trained_task():
    with pytest.raises(ConfigError, match=r"'data.synthetic.drop_labels.edge': not a trained task"):
        load_config(None, ["data.tasks=[semseg,depth]", "data.synthetic.drop_labels={edge: 0.5}"])
    assert load_config(None, ["data.synthetic.drop_labels={depth: 1.0}"]).data.synthetic.drop_labels == {"depth": 1.0}
