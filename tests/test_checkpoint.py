"""Checkpoints: atomic writes, weights_only loads, RNG round trips, clear errors on bad files."""

from __future__ import annotations

import pickle
import random
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from densemtl.cli import main
from densemtl.config import to_dict
from densemtl.engine import checkpoint
from densemtl.engine.checkpoint import capture_rng, load_checkpoint, load_model, restore_rng, save_checkpoint
from densemtl.errors import UserError
from tests.conftest import make_trainer, tiny_config

ENTRIES = {"config": {}, "info": {"name": "toy", "tasks": []}}  # the least a model checkpoint holds besides "model"


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
    path = save_checkpoint(tmp_path / "c.pt", {**ENTRIES, "model": {}, "rng": capture_rng()})
    expected = torch.rand(4)
    restore_rng(load_checkpoint(path)["rng"])
    assert torch.equal(torch.rand(4), expected)


def test_interrupted_save_keeps_the_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = save_checkpoint(tmp_path / "last.pt", {**ENTRIES, "model": {"w": torch.ones(2)}})

    def crash(obj: object, stream: object) -> None:
        stream.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {**ENTRIES, "model": {"w": torch.zeros(2)}})
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
    good = save_checkpoint(tmp_path / "good.pt", {**ENTRIES, "model": {"w": torch.ones(100)}})
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
    with pytest.raises(UserError, match=r"model does not fit the config: model.head_channels \(16 in the run, 8 in"):
        make_trainer(tiny_config(tmp_path, "model.head_channels=8")).fit(resume=True)


def _cli_error(capsys: pytest.CaptureFixture[str]) -> str:
    """The one error line the CLI printed (progress bars aside); fails on a traceback or several lines."""
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "densemtl: error" in line]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


@pytest.mark.parametrize(
    "override, needle",
    [
        ("data.tasks=[semseg]", "data.tasks (['semseg', 'depth'] in the run, ['semseg'] in the config)"),
        ("model.backbone=resnet-18", "model.backbone ('resnet-tiny' in the run, 'resnet-18' in the config)"),
        ("model.arch=single", "model.arch ('multitask' in the run, 'single' in the config)"),
        ("loss.balancer=uncertainty", "loss.balancer ('fixed' in the run, 'uncertainty' in the config)"),
    ],
)
def test_resume_with_a_model_that_does_not_fit_names_what_differs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], override: str, needle: str
) -> None:
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(to_dict(tiny_config(tmp_path, "train.steps=1", "data.tasks=[semseg,depth]"))))
    assert main(["train", str(config)]) == 0
    assert main(["train", str(config), override, "--resume"]) == 2
    assert needle in _cli_error(capsys)


def _flip_tensor_bytes(path: Path, entry: str = "data/0") -> None:
    """Invert 16 bytes in the middle of the stored bytes of tensor ``entry`` of a torch zip file."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        info = next(item for item in archive.infolist() if item.filename.endswith(entry))
    name_length, extra_length = struct.unpack("<HH", data[info.header_offset + 26 : info.header_offset + 30])
    start = info.header_offset + 30 + name_length + extra_length + info.file_size // 2
    data[start : start + 16] = bytes(byte ^ 0xFF for byte in data[start : start + 16])
    path.write_bytes(bytes(data))


def test_flipped_bytes_in_tensor_data_are_caught_naming_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trainer = make_trainer(tiny_config(tmp_path, "train.steps=1"))
    trainer.fit()
    path = trainer.checkpoint_dir / "last.pt"
    clean = load_checkpoint(path)
    assert "checksum" not in clean  # checked, then left out of what callers see
    _flip_tensor_bytes(path)
    with pytest.raises(UserError, match=r"last.pt: damaged checkpoint: its tensor data does not match the checksum"):
        load_checkpoint(path)
    for argv in (["evaluate", "--checkpoint", str(path)], ["predict", "--checkpoint", str(path), "x.png", "--out",
                                                            str(tmp_path / "p")]):
        assert main(argv) == 2
        assert str(path) in _cli_error(capsys)
    with pytest.raises(UserError, match="damaged"):
        trainer.fit(resume=True)


def test_files_that_are_not_checkpoints_give_one_line_and_never_suggest_unsafe_loading(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "text.pt").write_text("not a checkpoint " * 500)
    torch.save({"model": {}, "config": {}}, tmp_path / "no_info.pt")
    torch.save({"model": {}, "config": {}, "info": {"name": "x"}}, tmp_path / "no_tasks.pt")
    torch.save({"model": {}, "config": {}, "info": {"tasks": ["depth"], "colour": 1}}, tmp_path / "odd_info.pt")
    torch.save([torch.ones(2)], tmp_path / "a_list.pt")
    torch.save({"model": {}, "config": {}, "extra": Path("x")}, tmp_path / "objects.pt")  # needs full unpickling
    with open(tmp_path / "pickle.pt", "wb") as stream:
        pickle.dump({"model": 1, "config": 2}, stream)
    expected = {
        "text.pt": "not a readable checkpoint", "no_info.pt": "no 'info' entry", "no_tasks.pt": "names no tasks",
        "odd_info.pt": "not a dataset description", "a_list.pt": "holds a list", "objects.pt": "Python objects",
        "pickle.pt": "not a readable checkpoint",
    }
    for name, needle in expected.items():
        assert main(["predict", "--checkpoint", str(tmp_path / name), "x.png", "--out", str(tmp_path / "p")]) == 2
        line = _cli_error(capsys)
        assert f"{name}:" in line and needle in line, line
        assert "weights_only" not in line and "\x1b" not in line
    make_trainer(tiny_config(tmp_path, "train.steps=1")).fit()
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    state = load_checkpoint(last)
    del state["optimizer"]
    save_checkpoint(last, state)
    load_model(last)  # enough to predict with
    with pytest.raises(UserError, match="last.pt: not a densemtl checkpoint \\(no 'optimizer' entry\\)"):
        make_trainer(tiny_config(tmp_path, "train.steps=1")).fit(resume=True)


def test_a_checkpoint_with_non_finite_weights_cannot_predict(tmp_path: Path) -> None:
    """Checkpoints written before training refused to save them may hold NaN: predict and evaluate say so."""
    make_trainer(tiny_config(tmp_path, "train.steps=1")).fit()
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    state = load_checkpoint(last)
    next(value for value in state["model"].values() if value.is_floating_point()).fill_(float("nan"))
    save_checkpoint(last, state)
    with pytest.raises(UserError, match="last.pt: 1 weight tensor\\(s\\) hold NaN or infinite values"):
        load_model(last)
