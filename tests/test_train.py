"""The training engine: losses fall, resume is exact, NaN stops cleanly, objective terms, schedules."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from densemtl.cli import main
from densemtl.config import to_dict
from densemtl.data import build_dataset
from densemtl.engine.checkpoint import load_checkpoint, load_model, nonfinite_tensors
from densemtl.engine.objective import Objective, to_target_size
from densemtl.engine.predict import predict_images
from densemtl.engine.schedule import lr_factor
from densemtl.engine.trainer import Trainer, parameter_groups
from densemtl.errors import ConfigError, TrainingDiverged, UserError
from densemtl.losses.balancers import build_balancer
from densemtl.tasks import DepthTask, build_tasks
from tests.conftest import make_trainer, read_log, tiny_config


def test_multitask_losses_fall_and_run_directory_is_written(tmp_path: Path) -> None:
    config = tiny_config(tmp_path, "train.steps=24", "train.lr=3e-3", "train.schedule=constant", "data.flip=false")
    trainer = make_trainer(config)
    trainer.fit()
    records = read_log(Path(config.out_dir))
    assert [r["step"] for r in records] == list(range(1, 25))
    for key in ["loss/total", "loss/semseg", "loss/depth", "loss/normals"]:
        first = np.mean([r[key] for r in records[:3]])
        last = np.mean([r[key] for r in records[-3:]])
        assert last < 0.8 * first, f"{key} did not fall: {first:.4f} -> {last:.4f}"
    assert all(0 <= r["data_wait_share"] <= 1 and r["images_per_s"] > 0 for r in records)
    assert records[0]["weight/normals"] == 10.0  # the task's default weight reaches the balancer
    run = Path(config.out_dir)
    assert (run / "config.yaml").is_file() and (run / "checkpoints" / "last.pt").is_file()
    assert len(list((run / "tensorboard").iterdir())) == 1
    make_trainer(tiny_config(tmp_path, "train.steps=1")).fit()  # a fresh run in the same directory
    assert len(list((run / "tensorboard").iterdir())) == 1 and len(read_log(run)) == 1


class StopAt:
    """A loss hook that adds nothing and interrupts training when the trainer reaches ``step``."""

    def __init__(self, step: int | None) -> None:
        self.step = step
        self.trainer: Trainer | None = None

    def __call__(self, model: nn.Module, output: dict, batch: dict) -> dict[str, torch.Tensor]:
        if self.trainer is not None and self.trainer.step == self.step:
            raise KeyboardInterrupt
        return {}


def rng_hungry_evaluator(model: nn.Module) -> dict[str, dict[str, float]]:
    """Consumes every RNG stream (as a real evaluation's data loader would) and reports a weight sum."""
    torch.rand(5)
    np.random.rand(5)
    total = float(sum(p.detach().double().sum() for p in model.parameters()))
    return {"semseg": {"mIoU": total}, "depth": {"rmse": -total}}


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_exactly(tmp_path: Path, workers: int) -> None:
    """8 steps in one go == 4 steps, interruption, --resume, 4 more (bit-equal weights, EMA, optimiser).

    The straight run validates only at the end, the interrupted one every 3 steps: validation must not
    change the training trajectory either. With data workers the resumed epoch hands its remaining samples
    to the workers differently, so the augmentation must depend on the sample, not on the worker.
    """
    overrides = [
        "train.steps=8", "train.checkpoint_every=4", "train.accumulate=2", f"data.num_workers={workers}",
        "data.batch_size=2", "train.ema_decay=0.9", "data.scale_range=[0.7,1.3]", "data.crop_size=[24,40]",
    ]
    config = tiny_config(tmp_path, *overrides)
    straight = make_trainer(config, tmp_path / "straight", loss_hook=StopAt(None), evaluator=rng_hungry_evaluator)
    straight.fit()
    config = tiny_config(tmp_path, *overrides, "train.eval_every=3")

    hook = StopAt(4)
    first = make_trainer(config, tmp_path / "resumed", loss_hook=hook, evaluator=rng_hungry_evaluator)
    hook.trainer = first
    with pytest.raises(KeyboardInterrupt):
        first.fit()
    saved = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")
    assert saved["step"] == 4 and saved["data_position"] == {"epoch": 1, "batch": 2}  # 6 batches per epoch
    torch.manual_seed(1234)  # the resumed process starts from other RNG states
    second = make_trainer(config, tmp_path / "resumed", loss_hook=StopAt(None), evaluator=rng_hungry_evaluator)
    second.fit(resume=True)

    a = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == 8
    for key in ["model", "objective"]:
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs after resume"
    for name in a["ema"]["model"]:
        assert torch.equal(a["ema"]["model"][name], b["ema"]["model"][name]), f"ema.{name} differs"
    for index, state in a["optimizer"]["state"].items():
        assert torch.equal(state["exp_avg_sq"], b["optimizer"]["state"][index]["exp_avg_sq"])
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"] == 8
    assert a["data_position"] == b["data_position"]
    # the log of the resumed run continues where the first part stopped
    assert [r["step"] for r in read_log(tmp_path / "resumed")] == list(range(1, 9))


def test_nan_loss_stops_naming_the_task_and_keeps_last_good_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = {"n": 0}
    original = DepthTask.loss

    def poisoned(self: DepthTask, raw: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        loss = original(self, raw, target)
        return loss * float("nan") if calls["n"] == 4 else loss

    monkeypatch.setattr(DepthTask, "loss", poisoned)
    config = tiny_config(tmp_path, "train.checkpoint_every=2")
    with pytest.raises(TrainingDiverged, match="'depth'.*step 3"):
        make_trainer(config).fit()
    kept = load_checkpoint(Path(config.out_dir) / "checkpoints" / "last.pt")
    assert kept["step"] == 2
    assert all(torch.isfinite(v).all() for v in kept["model"].values() if v.is_floating_point())


@pytest.mark.parametrize("placement", ["official", "in_task"])
def test_objective_adds_deep_supervision_extra_losses_and_hook_terms(tmp_path: Path, placement: str) -> None:
    info = build_dataset(tiny_config(tmp_path).data, "val", train=False).info
    tasks = build_tasks(["semseg", "depth"], info)
    config = tiny_config(tmp_path, "data.tasks=[semseg,depth]", "loss.weights={semseg: 2.0, depth: 1.0}")
    objective = Objective(tasks, build_balancer(config.loss, list(tasks)), traceback_weight=0.5,
                          deep_supervision=placement)
    torch.manual_seed(0)
    batch = {"semseg": torch.randint(0, 13, (2, 8, 12)), "depth": torch.rand(2, 1, 8, 12) + 0.5}
    pred = {"semseg": torch.randn(2, 13, 8, 12), "depth": torch.rand(2, 1, 8, 12)}
    inter = {"semseg": [torch.randn(2, 13, 4, 6), torch.randn(2, 13, 8, 12)]}
    output = {"pred": pred, "intermediate": inter, "extra_losses": {"l0": torch.tensor(0.25)}}
    total, figures = objective(output, batch, step=0, shared=[], extra={"hook": torch.tensor(1.5)})
    upsampled, full = (to_target_size(raw, batch["semseg"]) for raw in inter["semseg"])
    assert upsampled.shape == (2, 13, 8, 12) and full is inter["semseg"][1]
    semseg = tasks["semseg"].loss(pred["semseg"], batch["semseg"])
    deep = tasks["semseg"].loss(upsampled, batch["semseg"]) + tasks["semseg"].loss(full, batch["semseg"])
    depth = tasks["depth"].loss(pred["depth"], batch["depth"])
    if placement == "official":  # outside the task weight (2.0), full-resolution targets, 0.5 per head
        expected = 2.0 * semseg + depth + 0.5 * deep + 0.25 + 1.5
        assert torch.allclose(figures["loss/deep_supervision"], 0.5 * deep)
    else:
        expected = 2.0 * (semseg + 0.5 * deep) + depth + 0.25 + 1.5
        assert "loss/deep_supervision" not in figures
    assert torch.allclose(total, expected)
    assert set(figures) >= {"loss/semseg", "loss/semseg_intermediate", "loss/l0", "loss/hook", "weight/semseg"}
    with pytest.raises(TrainingDiverged, match="'l0'"):
        objective({**output, "extra_losses": {"l0": torch.tensor(float("inf"))}}, batch, step=5, shared=[])


def test_schedules_warm_up_then_decay() -> None:
    assert lr_factor(0, 100, 10, "poly") == pytest.approx(1 / 11)
    assert lr_factor(9, 100, 10, "cosine") == pytest.approx(10 / 11)
    assert lr_factor(10, 100, 10, "poly") == 1.0
    assert lr_factor(55, 100, 10, "cosine") == pytest.approx(0.5)
    assert lr_factor(100, 100, 10, "poly") == 0.0
    assert lr_factor(99, 100, 0, "constant") == 1.0
    poly = [lr_factor(s, 100, 10, "poly") for s in range(10, 100)]
    assert all(a > b for a, b in zip(poly[:-1], poly[1:], strict=True))


def test_no_weight_decay_on_norms_and_biases() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1, bias=False))
    decay, no_decay = parameter_groups(net.parameters(), 0.01)
    assert [tuple(p.shape) for p in decay["params"]] == [(4, 3, 3, 3), (2, 4, 1, 1)]
    assert len(no_decay["params"]) == 3 and no_decay["weight_decay"] == 0.0


def test_bf16_autocast_on_cpu_trains_and_fp16_is_refused(tmp_path: Path) -> None:
    trainer = make_trainer(tiny_config(tmp_path, "train.amp=bf16"))
    figures = trainer.train_step()
    assert math.isfinite(figures["loss/total"]) and trainer.step == 1
    with pytest.raises(ConfigError, match="train.amp"):
        make_trainer(tiny_config(tmp_path, "train.amp=fp16"))


def test_batch_larger_than_training_set_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="data.batch_size"):
        make_trainer(tiny_config(tmp_path, "data.batch_size=16"))


def test_run_training_validates_keeps_best_and_writes_results(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from densemtl.engine.run import run_training

    config = tiny_config(tmp_path, "train.steps=4", "train.eval_every=2", "train.lr=3e-3")
    results = run_training(config)
    run = Path(config.out_dir)
    saved = json.loads((run / "results.json").read_text())
    assert saved["step"] == 4 and saved["results"] == results and saved["config"]["train"]["steps"] == 4
    assert set(results) == {"semseg", "depth", "normals", "edge"}
    assert {"mIoU", "rmse", "mean", "odsF"} <= {m for metrics in results.values() for m in metrics}
    validations = read_log(run, "val")
    assert [r["step"] for r in validations] == [2, 4] and validations[-1]["results"] == results
    grid = np.array(Image.open(run / "val_predictions.png"))  # 3 samples; image + target|prediction per task
    assert grid.shape == (3 * 32, 48 * (1 + 2 * 4), 3)
    best = load_checkpoint(run / "checkpoints" / "best.pt")
    assert best["step"] == saved["best"]["step"] in (2, 4)
    table = capsys.readouterr().out
    for name in results:  # one row per task, primary metric first
        row = next(line for line in table.splitlines() if line.startswith(name))
        primary = {"semseg": "mIoU", "depth": "rmse", "normals": "mean", "edge": "odsF"}[name]
        assert row.split()[1].startswith(f"{primary}=")


def test_network_and_objective_gradients_are_clipped_apart(tmp_path: Path) -> None:
    """Learnable balancer weights must not shrink the network's step: each side is clipped on its own."""
    clip = 1e-3
    trainer = make_trainer(tiny_config(tmp_path, "loss.balancer=uncertainty", f"train.grad_clip={clip}"))
    trainer.train_step()
    network = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in trainer.model.parameters()
                                                    if p.grad is not None]))
    balancer = [p.grad for p in trainer.objective.parameters() if p.grad is not None]
    assert balancer and torch.linalg.vector_norm(torch.stack([g.norm() for g in balancer])) > 0
    assert network.item() == pytest.approx(clip, rel=1e-3)


class InfiniteGradient(torch.autograd.Function):
    """The identity forward; an infinite gradient backward (a finite loss whose gradient is not)."""

    @staticmethod
    def forward(ctx: object, value: torch.Tensor) -> torch.Tensor:
        return value.clone()

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
        return torch.full_like(grad, float("inf"))


class PoisonAt:
    """A loss hook adding a zero term whose gradient is infinite when the trainer is at ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.trainer: Trainer | None = None

    def __call__(self, model: nn.Module, output: dict, batch: dict) -> dict[str, torch.Tensor]:
        if self.trainer is None or self.trainer.step != self.step:
            return {}
        return {"poison": InfiniteGradient.apply(output["pred"]["depth"]).mean() * 0}


def _predicts_finite(checkpoint: Path, tmp_path: Path) -> bool:
    """``densemtl predict`` on two validation frames writes finite maps (and the model's raw outputs are)."""
    loaded = load_model(checkpoint)
    frames = build_dataset(loaded.config.data, "val", train=False).arrays["image"][:2]
    images = []
    for index, frame in enumerate(frames):
        images.append(tmp_path / "frames" / f"f{index}.png")
        images[-1].parent.mkdir(exist_ok=True)
        Image.fromarray(frame).save(images[-1])
    predict_images(checkpoint, images, tmp_path / "predicted", device="cpu")
    depth = [np.load(path) for path in sorted((tmp_path / "predicted" / "depth").glob("*.npy"))]
    raw = loaded.model(torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255)["pred"]
    return len(depth) == 2 and all(np.isfinite(d).all() for d in depth) and not nonfinite_tensors(raw)


def test_a_non_finite_gradient_stops_before_the_step_and_every_checkpoint_stays_finite(tmp_path: Path) -> None:
    config = tiny_config(tmp_path, "train.checkpoint_every=1", "train.eval_every=2")
    hook = PoisonAt(3)
    trainer = make_trainer(config, loss_hook=hook, evaluator=rng_hungry_evaluator)
    hook.trainer = trainer
    with pytest.raises(TrainingDiverged, match=r"non-finite gradient after step 3 \(first in '.+'\).*step 3\) is kept"):
        trainer.fit()
    run = Path(config.out_dir)
    last, best = (load_checkpoint(run / "checkpoints" / name) for name in ("last.pt", "best.pt"))
    assert last["step"] == 3 and best["step"] == 2
    assert nonfinite_tensors(last) == [] and nonfinite_tensors(best) == []
    # the poisoned step was never taken (its forward pass did update the BatchNorm statistics)
    assert all(torch.equal(last["model"][name], param) for name, param in trainer.model.named_parameters())
    assert _predicts_finite(run / "checkpoints" / "last.pt", tmp_path)


def test_a_huge_learning_rate_exits_3_and_leaves_no_checkpoint_that_predicts_nan(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(to_dict(tiny_config(tmp_path, "train.steps=20", "train.checkpoint_every=1"))))
    assert main(["train", str(config), "train.lr=1e6"]) == 3
    for checkpoint in (tmp_path / "run").rglob("*.pt"):
        assert nonfinite_tensors(load_checkpoint(checkpoint)) == [], checkpoint
        assert _predicts_finite(checkpoint, tmp_path / checkpoint.stem), checkpoint
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "densemtl: error" in line]  # after the progress bars
    assert len(errors) == 1 and "NaN or infinite" in errors[0] and "Traceback" not in err


def test_with_fp16_scaling_a_non_finite_gradient_skips_the_step_as_the_scaler_decides(tmp_path: Path) -> None:
    hook = PoisonAt(1)
    trainer = make_trainer(tiny_config(tmp_path), loss_hook=hook)
    hook.trainer = trainer
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=256.0)  # fp16 scaling, which the CPU refuses in configs
    trainer.train_step()
    before = [param.detach().clone() for param in trainer.model.parameters()]
    trainer.train_step()  # poisoned: the scaler skips it and halves its scale, training goes on
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters(), strict=True))
    assert trainer.scaler.get_scale() == 128.0 and trainer.step == 2
    trainer.train_step()
    assert not all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters(), strict=True))


def test_resume_drops_the_log_lines_after_the_checkpoint(tmp_path: Path) -> None:
    """Killed at step 5 with a checkpoint at 3: steps 4 and 5 are trained again and logged once."""
    config = tiny_config(tmp_path, "train.checkpoint_every=3", "train.eval_every=3")
    hook = StopAt(5)
    first = make_trainer(config, loss_hook=hook, evaluator=rng_hungry_evaluator)
    hook.trainer = first
    with pytest.raises(KeyboardInterrupt):
        first.fit()
    run = Path(config.out_dir)
    assert [r["step"] for r in read_log(run)] == [1, 2, 3, 4, 5]
    with open(run / "log.jsonl", "a") as stream:
        stream.write('{"kind": "train", "st')  # a line cut short by the kill
    make_trainer(config, evaluator=rng_hungry_evaluator).fit(resume=True)
    assert [r["step"] for r in read_log(run)] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in read_log(run, "val")] == [3, 6]
    events = EventAccumulator(str(run / "tensorboard"))  # TensorBoard's reader drops the purged steps
    events.Reload()
    assert [event.step for event in events.Scalars("train/loss/total")] == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize(
    "override, needle",
    [
        ("train.steps=8", "train.steps (6 in the run, 8 in the config)"),
        ("train.lr=0.5", "train.lr (0.001 in the run, 0.5 in the config)"),
        ("train.warmup_steps=0", "train.warmup_steps (2 in the run, 0 in the config)"),
    ],
)
def test_resume_refuses_another_schedule(tmp_path: Path, override: str, needle: str) -> None:
    make_trainer(tiny_config(tmp_path, "train.checkpoint_every=2", "train.steps=6"), loss_hook=StopAt(None)).fit()
    resumed = make_trainer(tiny_config(tmp_path, override))
    with pytest.raises(UserError, match="keeps the schedule it started with") as info:
        resumed.fit(resume=True)
    assert needle in str(info.value) and "\n" not in str(info.value)
