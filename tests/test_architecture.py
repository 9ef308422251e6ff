"""Architectures are table rows: a new one, trained in phases and deployed in its own form, needs no engine edit."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from densemtl.config import Config, load_config
from densemtl.dataset_info import DatasetInfo
from densemtl.engine.checkpoint import load_checkpoint, load_model
from densemtl.engine.evaluate import evaluate_checkpoint
from densemtl.engine.phased import phase_dir
from densemtl.engine.run import run_training
from densemtl.engine.video import predict_video
from densemtl.errors import ConfigError, UserError
from densemtl.models import build_model
from densemtl.models.architecture import Architecture, DeploymentCost, Phase
from densemtl.models.output import ModelOutput
from densemtl.registry import ARCHITECTURES
from densemtl.tasks import Task, build_tasks


class TwoHeads(nn.Module):
    """A shared 3x3 convolution, then a 1x1 head per task."""

    def __init__(self, tasks: dict[str, Task]) -> None:
        super().__init__()
        self.tasks = dict(tasks)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.heads = nn.ModuleDict({name: nn.Conv2d(8, task.channels, 1) for name, task in tasks.items()})
        self.feature_channels = dict.fromkeys(tasks, 8)

    def forward(self, image: torch.Tensor) -> ModelOutput:
        shared = torch.relu(self.stem(image))
        return {"pred": {name: head(shared) for name, head in self.heads.items()},
                "features": dict.fromkeys(self.heads, shared)}


def train_only(names: tuple[str, ...]):
    """Entering a phase: only the heads of ``names`` (and, in the first phase, the stem) require gradients."""

    def enter(model: nn.Module) -> None:
        model.stem.requires_grad_("semseg" in names)
        for name, head in model.heads.items():
            head.requires_grad_(name in names)

    return enter


def toy_phases(config: Config, model: nn.Module) -> list[Phase]:
    return [Phase("first", 2, ("semseg",), enter=train_only(("semseg",))),
            Phase("second", 3, ("depth",), enter=train_only(("depth",)))]


class Counting(nn.Module):
    """The toy's deployed form: the trained network, counting the images it sees."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.images = 0

    def forward(self, image: torch.Tensor) -> ModelOutput:
        self.images += image.shape[0]
        return {"pred": self.model(image)["pred"]}

    def cost_report(self) -> DeploymentCost:
        return DeploymentCost("toy", {"images": self.images}, f"toy deployment saw {self.images} images")


def build_toy(config: Config, info: DatasetInfo, tasks: dict[str, Task]) -> nn.Module:
    return TwoHeads(tasks)


@pytest.fixture
def toy_architecture() -> Iterator[str]:
    ARCHITECTURES.register("toy", Architecture(build=build_toy, phases=toy_phases,
                                               deploy=lambda model, config: Counting(model)))
    yield "toy"
    ARCHITECTURES.unregister("toy")


def toy_config(tmp_path: Path, arch: str) -> Config:
    return load_config(None, [
        f"model.arch={arch}", "data.tasks=[semseg,depth]", "data.synthetic.height=32", "data.synthetic.width=48",
        "data.synthetic.num_train=8", "data.synthetic.num_val=2", "data.synthetic.num_test=2",
        f"data.synthetic.cache_dir={tmp_path / 'cache'}", "data.batch_size=4", "data.eval_batch_size=2",
        "train.device=cpu", "train.warmup_steps=0", "train.eval_every=1000", "train.checkpoint_every=1000",
        f"out_dir={tmp_path / 'run'}",
    ])


def test_a_registered_architecture_trains_in_its_phases_and_is_deployed(
    tmp_path: Path, toy_architecture: str, capsys: pytest.CaptureFixture[str]
) -> None:
    config = toy_config(tmp_path, toy_architecture)
    results = run_training(config)
    run = tmp_path / "run"
    first = load_checkpoint(phase_dir(run, 0, "first") / "checkpoints" / "last.pt")
    second = load_checkpoint(phase_dir(run, 1, "second") / "checkpoints" / "last.pt")
    assert (first["step"], second["step"]) == (2, 3)
    # each phase validates its own tasks; the run's results are every task through the deployed form
    assert set(json.loads((phase_dir(run, 0, "first") / "results.json").read_text())["results"]) == {"semseg"}
    assert set(json.loads((phase_dir(run, 1, "second") / "results.json").read_text())["results"]) == {"depth"}
    saved = json.loads((run / "results.json").read_text())
    assert set(results) == {"semseg", "depth"} and saved["results"] == results and saved["step"] == 5
    # the second phase trained only the depth head: the stem and the semseg head kept phase 0's weights
    for key in ("stem.weight", "heads.semseg.weight"):
        assert torch.equal(first["model"][key], second["model"][key]), key
    assert not torch.equal(first["model"]["heads.depth.weight"], second["model"]["heads.depth.weight"])
    assert torch.equal(load_checkpoint(run / "checkpoints" / "last.pt")["model"]["heads.depth.weight"],
                       second["model"]["heads.depth.weight"])
    printed = capsys.readouterr().out
    assert "phase 0 (first): 2 steps on semseg" in printed and "phase 1 (second): 3 steps on depth" in printed

    again = run_training(config, resume=True)  # both phases are done: loaded, not trained again
    printed = capsys.readouterr().out
    assert "phase 0 (first) already finished" in printed and "phase 1 (second) already finished" in printed
    assert again == results

    checkpoint = run / "checkpoints" / "last.pt"
    evaluated = evaluate_checkpoint(checkpoint, out=tmp_path / "e.json")
    assert "toy deployment saw 2 images" in capsys.readouterr().out  # the deployed form reports its cost
    assert json.loads((tmp_path / "e.json").read_text())["evaluation"]["toy"] == {"images": 2}
    assert evaluated == results
    with pytest.raises(UserError, match="model.arch 'toy' runs frame by frame"):  # no reuse to set a threshold of
        predict_video(checkpoint, tmp_path / "frames", tmp_path / "video", threshold=0.1)


def test_build_model_goes_through_the_table(tmp_path: Path, toy_architecture: str) -> None:
    config = toy_config(tmp_path, toy_architecture)
    info = DatasetInfo("synthetic", ("semseg", "depth"), num_classes={"semseg": 3})
    assert isinstance(build_model(config, info, build_tasks(["semseg", "depth"], info)), TwoHeads)
    config.model.arch = "tower"
    with pytest.raises(ConfigError, match="architecture 'tower' .*known: multitask, single, mtcp, sharing, toy"):
        build_model(config, info, {})


def test_one_phase_architectures_train_in_the_run_directory(tmp_path: Path) -> None:
    config = toy_config(tmp_path, "multitask")
    config.train.steps = 2
    results = run_training(config)
    run = tmp_path / "run"
    assert not list(run.glob("phase*")) and load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 2
    assert json.loads((run / "results.json").read_text())["results"] == results
    assert load_model(run / "checkpoints" / "last.pt").model.__class__.__name__ == "MultiTaskModel"


def test_best_checkpoint_score_and_delta_m_share_the_relative_change() -> None:
    from densemtl.engine.results import primary_score
    from densemtl.metrics.delta_m import delta_m, relative_change
    results = {"semseg": {"mIoU": 45.0}, "depth": {"rmse": 0.55}}
    reference = {"semseg": {"mIoU": 40.0}, "depth": {"rmse": 0.5}}
    assert relative_change(45.0, 40.0, lower_is_better=False) == pytest.approx(0.125)
    assert relative_change(0.55, 0.5, lower_is_better=True) == pytest.approx(-0.1)
    tasks = build_tasks(["semseg", "depth"], DatasetInfo("synthetic", ("semseg", "depth"), num_classes={"semseg": 3}))
    assert primary_score(results, tasks, reference) == pytest.approx(0.0125)
    assert delta_m(results, reference) == pytest.approx(100 * primary_score(results, tasks, reference))
