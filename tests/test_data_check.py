"""``densemtl data check``: clean folders pass; corrupt, missing and wrong-shape files are named, exit code 1."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from densemtl.cli import main
from densemtl.data import check
from densemtl.data.check import check_dataset
from densemtl.engine.run import run_training
from densemtl.errors import DataError
from tests.conftest import tiny_config
from tests.dataset_fixtures import NYUD_LAYOUTS, write_nyud, write_pascal


@pytest.mark.parametrize("layout", NYUD_LAYOUTS)
def test_clean_nyud_passes_with_a_summary(tmp_path: Path, layout: str, capsys: pytest.CaptureFixture) -> None:
    write_nyud(tmp_path, layout=layout, splits={"train": 3, "val": 2})
    assert check_dataset(tmp_path) == []
    out = capsys.readouterr().out
    assert f"layout {layout}" in out and "0 problem(s)" in out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.startswith(("train", "val"))}
    assert rows == {"train": ["3"] * 7, "val": ["2"] * 7}  # samples, 5 file kinds, opened
    assert main(["data", "check", str(tmp_path)]) == 0


def test_clean_pascal_passes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_pascal(tmp_path)
    assert check_dataset(tmp_path, dataset="pascal") == []
    assert "PASCAL-Context" in capsys.readouterr().out


def test_nyud_problems_are_named_one_line_each(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_nyud(tmp_path, layout="NYUD_MT", splits={"train": 4, "val": 2})
    (tmp_path / "images" / "train_000.jpg").write_bytes(b"\xff\xd8 truncated jpeg")
    (tmp_path / "depth" / "val_001.npy").unlink()
    Image.fromarray(np.ones((10, 12), np.uint8)).save(tmp_path / "segmentation" / "train_001.png")
    np.save(tmp_path / "normals" / "train_002.npy", np.full((24, 32, 3), 0.9, np.float32))
    np.save(tmp_path / "depth" / "train_003.npy", np.full((24, 32), 2500.0, np.float32))
    with (tmp_path / "gt_sets" / "val.txt").open("a") as split:
        split.write("train_003\n")
    problems = check_dataset(tmp_path)
    expected = {
        "images/train_000.jpg": "cannot read image",
        "depth/val_001.npy": "missing",
        "segmentation/train_001.png": "semseg target is 10x12, the image train_001.jpg is 24x32",
        "normals/train_002.npy": "not unit length",
        "depth/train_003.npy": "millimetres",
        "gt_sets/val.txt": "'train_003' is also in split 'train'",
    }
    assert len(problems) == len(expected), problems
    for path, message in expected.items():
        assert any(f"{path}: " in line and message in line for line in problems), (path, problems)
    out = capsys.readouterr().out
    assert f"{len(expected)} problem(s)" in out and all(line in out for line in problems)
    assert main(["data", "check", str(tmp_path)]) == 1


def test_pascal_missing_folder_and_bad_mat(tmp_path: Path) -> None:
    write_pascal(tmp_path, splits={"val": 2})
    shutil.rmtree(tmp_path / "sal_distill")
    (tmp_path / "human_parts" / "val_000.mat").write_bytes(b"")
    Image.fromarray(np.full((24, 32), 21, np.uint8)).save(tmp_path / "semseg" / "pascal-context" / "val_001.png")
    problems = check_dataset(tmp_path)
    assert len(problems) == 3, problems
    assert any("sal_distill: folder missing (2 files of split 'val')" in line for line in problems)
    assert any("human_parts/val_000.mat: cannot read MATLAB file" in line for line in problems)
    assert any("pascal-context/val_001.png: label values [21]" in line for line in problems)


def test_quick_opens_a_sample(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    write_nyud(tmp_path, layout="NYUDv2", splits={"train": 5}, height=8, width=8)
    (tmp_path / "edge" / "train_002.png").write_bytes(b"broken")
    monkeypatch.setattr(check, "QUICK_SAMPLES", 2)
    assert check_dataset(tmp_path, quick=True) == []  # opens the first and the last sample only
    out = capsys.readouterr().out
    assert out.splitlines()[2].split()[-1] == "2"
    assert len(check_dataset(tmp_path)) == 1


def test_not_a_dataset(tmp_path: Path) -> None:
    assert "neither NYUD-v2" in check_dataset(tmp_path)[0]
    assert "not found" in check_dataset(tmp_path / "absent")[0]
    assert main(["data", "check", str(tmp_path)]) == 1


@pytest.mark.parametrize("workers", [0, 2])
def test_nan_in_a_target_is_named_by_data_check_and_by_training(
    tmp_path: Path, capsys: pytest.CaptureFixture, workers: int
) -> None:
    """An edge map's range test lets NaN through; the loss would then report a divergence, not the file."""
    root = tmp_path / "nyud"
    write_nyud(root, layout="NYUD_MT", splits={"train": 4, "val": 2})
    for name, value in (("train_001", np.nan), ("val_000", np.inf)):
        edge = np.load(root / "edge" / f"{name}.npy")
        edge[3, 4] = value
        np.save(root / "edge" / f"{name}.npy", edge)
    problems = check_dataset(root)
    assert problems == [f"{root / 'edge' / name}.npy: edge target holds NaN or infinite values (1 of 768)"
                        for name in ("train_001", "val_000")]
    config = tiny_config(tmp_path, "data.dataset=nyud", f"data.root={root}", "data.tasks=[semseg,edge]",
                         "data.batch_size=2", f"data.num_workers={workers}")
    with pytest.raises(DataError) as info:
        run_training(config)
    assert str(info.value) == problems[0]  # one line, also when a data worker found it
