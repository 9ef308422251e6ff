"""Checkpoints: atomic writes, weights_only loads, RNG round trips, clear errors on bad files."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from densemtl.engine import checkpoint
from densemtl.engine.checkpoint import capture_rng, load_checkpoint, load_model, restore_rng, save_checkpoint
from densemtl.errors import UserError
from tests.conftest import make_trainer, tiny_config


def test_training_checkpoint_holds_every_piece_and_loads_weights_only(tmp_path: Path) -> None:
    trainer = make_trainer(tiny_config(tmp_path, "train.steps=2", "train.ema_decay=0.5", "loss.balancer=uncertainty"))
    trainer.fit()
    state = load_checkpoint(Path(trainer.run_dir) / "checkpoints" / "last.pt")  # weights_only=True inside
    expected = {"config", "info", "model", "optimizer", "scheduler", "scaler", "objective", "ema", "rng", "step",
                "data_position"}
    assert expected <= set(state)
    assert isinstance(state["config"], dict) and state["config"]["train"]["steps"] == 2
    assert state["step"] == 2 and state["data_position"] == {"epoch": 0, "batch": 2}
    assert any("log_var" in key for key in state["objective"])  # learnable balancer state is kept
    loaded = load_model(Path(trainer.run_dir) / "checkpoints" / "last.pt")
    ema = trainer.ema.model.state_dict()
    assert all(torch.equal(ema[k], v) for k, v in loaded.model.state_dict().items())  # predicts with the EMA
    assert not loaded.model.training and set(loaded.tasks) == set(trainer.tasks)


def test_rng_states_round_trip() -> None:
    state = capture_rng()
    first = (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist())
    restore_rng(state)
    assert (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist()) == first


def test_a_checkpoint_with_the_older_balancer_key_resumes(tmp_path: Path) -> None:
    config = tiny_config(tmp_path, "train.steps=1", "loss.balancer=uncertainty")
    make_trainer(config).fit()
    path = tmp_path / "run" / "checkpoints" / "last.pt"
    state = load_checkpoint(path)
    state["balancer"] = state.pop("objective")
    save_checkpoint(path, state)
    resumed = make_trainer(config)
    resumed.resume()
    for key, value in resumed.objective.state_dict().items():
        assert torch.equal(value, state["balancer"][key]), key


def test_rng_state_survives_a_weights_only_file(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "c.pt", {"model": {}, "config": {}, "rng": capture_rng()})
    expected = torch.rand(4)
    restore_rng(load_checkpoint(path)["rng"])
    assert torch.equal(torch.rand(4), expected)


def test_interrupted_save_keeps_the_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = save_checkpoint(tmp_path / "last.pt", {"model": {"w": torch.ones(2)}, "config": {}})

    def crash(obj: object, stream: object) -> None:
        stream.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"model": {"w": torch.zeros(2)}, "config": {}})
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no temporary file left behind


def test_missing_corrupt_and_foreign_files_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="nothing.pt: checkpoint not found"):
        load_checkpoint(tmp_path / "nothing.pt")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x00not a zip archive at all")
    with pytest.raises(UserError, match="corrupt.pt: not a readable checkpoint"):
        load_checkpoint(corrupt)
    truncated = tmp_path / "truncated.pt"
    good = save_checkpoint(tmp_path / "good.pt", {"model": {"w": torch.ones(100)}, "config": {}})
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(UserError, match="truncated.pt"):
        load_checkpoint(truncated)
    foreign = save_checkpoint(tmp_path / "foreign.pt", {"weights": torch.ones(1)})
    with pytest.raises(UserError, match="foreign.pt: not a densemtl checkpoint"):
        load_checkpoint(foreign)


def test_resume_without_checkpoint_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="last.pt: checkpoint not found"):
        make_trainer(tiny_config(tmp_path)).fit(resume=True)


def test_resume_with_another_model_is_refused(tmp_path: Path) -> None:
    make_trainer(tiny_config(tmp_path, "train.steps=1")).fit()
    with pytest.raises(UserError, match="model or tasks differ"):
        make_trainer(tiny_config(tmp_path, "model.head_channels=8")).fit(resume=True)
