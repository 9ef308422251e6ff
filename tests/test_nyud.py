"""NYUD-v2 loader: both layouts, label conventions, 16-bit encodings, bad files, configs, synthetic round trip."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from densemtl.config import DataConfig, SyntheticConfig, load_config
from densemtl.data import build_dataset
from densemtl.data.nyud import NYUD_CLASS_NAMES, NYUDDataset
from densemtl.data.transforms import pad_to
from densemtl.errors import DataError
from densemtl.metrics.edge_protocols import seism_boundaries
from tests.dataset_fixtures import NYUD_LAYOUTS, write_nyud

TASKS = ["semseg", "depth", "normals", "edge"]
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _dataset(root: Path, split: str = "val", train: bool = False, **kwargs) -> NYUDDataset:
    return NYUDDataset(DataConfig(dataset="nyud", root=str(root), tasks=TASKS, **kwargs), split, train)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict]]:
    """The same frames written in both layouts."""
    base = tmp_path_factory.mktemp("nyud")
    return {layout: (base / layout, write_nyud(base / layout, layout=layout)) for layout in NYUD_LAYOUTS}


@pytest.mark.parametrize("layout", NYUD_LAYOUTS)
def test_layout_detected_and_targets_exact(folders: dict, layout: str) -> None:
    root, expected = folders[layout]
    dataset = _dataset(root)
    assert dataset.layout == layout
    assert len(dataset) == 2
    for index in range(len(dataset)):
        raw = dataset.load_raw(index)
        frame = expected["val"][raw["meta"]["name"]]
        np.testing.assert_array_equal(raw["semseg"], frame["semseg"])
        np.testing.assert_array_equal(raw["depth"][0], frame["depth"])
        np.testing.assert_array_equal(raw["normals"], frame["normals"])
        np.testing.assert_array_equal(raw["edge"][0], seism_boundaries(frame["edge"]))  # evaluation target
        np.testing.assert_array_equal(_dataset(root, train=True).load_raw(index)["edge"][0], frame["edge"])
        tolerance = 6 if layout == "NYUD_MT" else 0  # JPEG (quality 100) vs lossless PNG
        assert np.abs(raw["image"].astype(int) - frame["image"]).max() <= tolerance


def test_both_layouts_load_identically(folders: dict) -> None:
    first, second = (_dataset(folders[layout][0]) for layout in NYUD_LAYOUTS)
    assert first.names == second.names
    for index in range(len(first)):
        a, b = first[index], second[index]
        assert a["meta"] == b["meta"]
        for task in TASKS:
            assert a[task].dtype == b[task].dtype
            assert torch.equal(a[task], b[task]), task
        assert torch.allclose(a["image"], b["image"], atol=0.15)


def test_label_conventions(folders: dict) -> None:
    root, expected = folders["NYUDv2"]
    dataset = _dataset(root, split="train")
    sample = dataset[0]
    frame = expected["train"][sample["meta"]["name"]]
    semseg = sample["semseg"]
    # file 0 (void) -> 255, file 1 -> class 0, file 40 -> class 39 (fixture corner pixels)
    assert frame["semseg_file"][0, :3].tolist() == [0, 1, 40]
    assert semseg[0, :3].tolist() == [255, 0, 39]
    assert semseg.dtype == torch.int64 and int(semseg[semseg != 255].max()) <= 39
    depth_zero = torch.from_numpy(frame["depth"] == 0)
    assert depth_zero.any() and (sample["depth"][0][depth_zero] == 0).all()
    invalid = sample["normals"].abs().sum(0) == 0
    assert invalid.any()
    valid_norm = sample["normals"].norm(dim=0)[~invalid]
    assert torch.allclose(valid_norm, torch.ones_like(valid_norm), atol=0.01)
    assert set(sample["edge"].unique().tolist()) <= {0.0, 1.0}
    assert sample["meta"]["size"] == (24, 32)
    info = dataset.info
    assert info.num_classes == {"semseg": 40} and len(info.class_names["semseg"]) == 40
    assert info.class_names["semseg"] == NYUD_CLASS_NAMES and info.boundary_max_dist == 0.011


def test_sixteen_bit_depth_and_labels_load_like_npy(folders: dict, tmp_path: Path) -> None:
    write_nyud(tmp_path, layout="NYUDv2", depth_format="png16", semseg_bits=16)
    assert Image.open(next((tmp_path / "depth").glob("*.png"))).mode.startswith("I")
    reference = _dataset(folders["NYUDv2"][0])
    sixteen = _dataset(tmp_path)
    for index in range(len(reference)):
        a, b = reference.load_raw(index), sixteen.load_raw(index)
        np.testing.assert_array_equal(a["depth"], b["depth"])
        np.testing.assert_array_equal(a["semseg"], b["semseg"])


def test_semseg_value_out_of_range_names_the_file(tmp_path: Path) -> None:
    write_nyud(tmp_path, layout="NYUDv2")
    bad = tmp_path / "segmentation" / "val_000.png"
    Image.fromarray(np.full((24, 32), 41, np.uint8)).save(bad)
    with pytest.raises(DataError, match="val_000.png"):
        _dataset(tmp_path)[0]


def test_missing_file_error_or_skip(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_nyud(tmp_path, layout="NYUD_MT", splits={"train": 3})
    (tmp_path / "normals" / "train_001.npy").unlink()
    with pytest.raises(DataError, match=r"normals/train_001\.npy: missing"):
        _dataset(tmp_path, split="train")
    with caplog.at_level(logging.WARNING):
        dataset = _dataset(tmp_path, split="train", on_bad_sample="skip")
    assert dataset.names == ["train_000", "train_002"]
    assert "1 files missing" in caplog.text
    only_depth = NYUDDataset(DataConfig(dataset="nyud", root=str(tmp_path), tasks=["depth"]), "train", False)
    assert len(only_depth) == 3  # normals are not needed for this task list


def test_corrupt_file_error_or_skip(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_nyud(tmp_path, layout="NYUD_MT", splits={"val": 3})
    (tmp_path / "depth" / "val_001.npy").write_bytes(b"")
    with pytest.raises(DataError, match=r"depth/val_001\.npy"):
        _dataset(tmp_path)[1]
    dataset = _dataset(tmp_path, on_bad_sample="skip")
    with caplog.at_level(logging.WARNING):
        sample = dataset[1]
    assert sample["meta"]["name"] == "val_002"  # replaced by the next readable sample
    assert dataset.skipped == 1 and "val_001" in caplog.text and "1 skipped" in caplog.text


def test_unknown_split_and_task(folders: dict) -> None:
    root = folders["NYUDv2"][0]
    with pytest.raises(DataError, match=r"gt_sets/test\.txt.*train, val"):
        _dataset(root, split="test")
    with pytest.raises(DataError, match="saliency"):
        NYUDDataset(DataConfig(dataset="nyud", root=str(root), tasks=["saliency"]), "val", False)


def test_native_size_for_evaluation_and_padding(folders: dict) -> None:
    sample = _dataset(folders["NYUDv2"][0])[0]
    padded = pad_to(sample, (32, 40))
    assert padded["meta"]["size"] == (24, 32)
    assert (padded["semseg"][24:] == 255).all() and (padded["depth"][:, :, 32:] == 0).all()
    assert torch.equal(padded["semseg"][:24, :32], sample["semseg"])


def test_config_recipe_builds_the_dataset(folders: dict) -> None:
    root = folders["NYUD_MT"][0]
    config = load_config(CONFIGS / "nyud_multitask.yaml", [f"data.root={root}"])
    assert config.data.dataset == "nyud" and config.data.crop_size == [448, 576]
    assert config.data.tasks == TASKS and config.train.lr == pytest.approx(2e-5)
    assert config.data.batch_size == 4 and config.train.steps == 40000
    assert config.loss.weights == {"semseg": 1.0, "depth": 1.0, "normals": 10.0, "edge": 50.0}
    train = build_dataset(config.data, config.data.train_split, train=True)
    sample = train[0]
    assert sample["image"].shape == (3, 448, 576)
    assert sample["meta"]["size"] == (24, 32)
    val = build_dataset(config.data, config.data.val_split, train=False)
    assert val[0]["image"].shape == (3, 24, 32)


def test_synthetic_export_loads_back_identical(tmp_path: Path) -> None:
    from densemtl.data.export import export_synthetic
    from densemtl.data.synthetic import load_split

    synthetic = SyntheticConfig(height=24, width=32, num_train=1, num_val=2, num_test=0, num_clips=0,
                                cache_dir=str(tmp_path / "cache"))
    export_synthetic(synthetic, tmp_path / "export")
    arrays = load_split(synthetic, "val")
    dataset = _dataset(tmp_path / "export")
    assert dataset.layout == "NYUDv2" and len(dataset) == 2
    for index in range(2):
        raw = dataset.load_raw(index)
        np.testing.assert_array_equal(raw["image"], arrays["image"][index])
        np.testing.assert_array_equal(raw["semseg"], arrays["semseg"][index])
        np.testing.assert_array_equal(raw["depth"][0], arrays["depth"][index])
        np.testing.assert_array_equal(raw["edge"][0], seism_boundaries(arrays["edge"][index]))
        # normals go through the 8-bit PNG encoding: within half a quantisation step
        np.testing.assert_allclose(raw["normals"], arrays["normals"][index], atol=1.01 / 255)


def test_corrupt_file_in_a_loader_worker_names_the_file(tmp_path: Path) -> None:
    write_nyud(tmp_path, layout="NYUDv2", splits={"val": 2})
    (tmp_path / "normals" / "val_001.png").write_bytes(b"\x89PNG broken")
    loader = torch.utils.data.DataLoader(_dataset(tmp_path), batch_size=2, num_workers=1)
    with pytest.raises(DataError, match=r"normals/val_001\.png"):
        next(iter(loader))


def test_iteration_stops_at_the_end(folders: dict) -> None:
    dataset = _dataset(folders[NYUD_LAYOUTS[0]][0])
    assert len(list(iter(dataset))) == len(dataset)
    with pytest.raises(IndexError):
        dataset[len(dataset)]
