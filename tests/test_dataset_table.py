"""A new dataset is one class plus one DATASETS row; data code asks tasks instead of naming them.

A toy folder dataset, registered at run time, is validated by the config, built by ``build_dataset``,
measured by the bench, found and checked by ``densemtl data check`` and offered by the CLI, although no
module names it. A toy task registered the same way is augmented by the joint transforms through its
hooks alone.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from PIL import Image

from densemtl.cli import build_parser, main
from densemtl.config import DataConfig, load_config
from densemtl.data import build_dataset
from densemtl.data.check import check_dataset
from densemtl.data.files import FolderDataset, as_label_map, read_image_file, read_npy
from densemtl.data.transforms import JointTransform
from densemtl.dataset_info import DatasetInfo
from densemtl.engine.bench import bench_size, dataset_info
from densemtl.errors import ConfigError, DataError, UserError
from densemtl.registry import DATASETS, TASKS
from densemtl.tasks import Task

SIZE = (12, 16)
NAMES = {"train": ["a", "b", "c"], "val": ["d", "e"]}


class ToyDataset(FolderDataset):
    """Images with a 3-class map and depth: ``pictures/``, ``labels/*.png``, ``depth/*.npy``, ``lists/``."""

    dataset_name = "toy"
    title = "Toy scenes"
    supported_tasks = ("semseg", "depth")
    markers = ("lists",)
    _files: ClassVar[dict[str, str]] = {"image": "pictures/{name}.png", "semseg": "labels/{name}.png",
                                        "depth": "depth/{name}.npy"}

    @classmethod
    def split_file(cls, root: Path, split: str) -> Path:
        return Path(root) / "lists" / f"{split}.txt"

    @classmethod
    def sources(cls, root: Path, tasks: Iterable[str]) -> dict[str, tuple[str, ...]]:
        return {source: (cls._files[source],) for source in ("image", *tasks)}

    @classmethod
    def read_target(
        cls, task: str, files: dict[str, Path], size: tuple[int, int], cache: dict[str, Any]
    ) -> np.ndarray:
        readers = {"semseg": lambda path: as_label_map(read_image_file(path), path), "depth": read_npy}
        return readers[task](files[task])

    @classmethod
    def dataset_info(cls, tasks: Iterable[str]) -> DatasetInfo:
        return DatasetInfo("toy", tuple(tasks), num_classes={"semseg": 3}, class_names={"semseg": ["x", "y", "z"]})

    @classmethod
    def native_size(cls, data_config: DataConfig) -> tuple[int, int]:
        return SIZE


@pytest.fixture
def toy() -> Iterator[type[ToyDataset]]:
    DATASETS.register("toy", ToyDataset)
    yield ToyDataset
    DATASETS.unregister("toy")


def write_toy(root: Path) -> dict[str, dict[str, np.ndarray]]:
    """The toy folder; returns each sample's semseg and depth as written."""
    rng = np.random.default_rng(0)
    for folder in ("pictures", "labels", "depth", "lists"):
        (root / folder).mkdir(parents=True)
    written = {}
    for split, names in NAMES.items():
        (root / "lists" / f"{split}.txt").write_text("\n".join(names) + "\n")
        for name in names:
            labels = rng.integers(0, 3, SIZE).astype(np.uint8)
            depth = rng.uniform(0.5, 5.0, SIZE).astype(np.float32)
            Image.fromarray(rng.integers(0, 256, (*SIZE, 3), dtype=np.uint8)).save(root / "pictures" / f"{name}.png")
            Image.fromarray(labels).save(root / "labels" / f"{name}.png")
            np.save(root / "depth" / f"{name}.npy", depth)
            written[name] = {"semseg": labels.astype(np.int64), "depth": depth}
    return written


def test_a_registered_dataset_is_validated_built_and_benched(toy, tmp_path: Path) -> None:
    written = write_toy(tmp_path)
    config = load_config(None, ["data.dataset=toy", f"data.root={tmp_path}", "data.tasks=[semseg,depth]"])
    val = build_dataset(config.data, "val", train=False)
    assert isinstance(val, ToyDataset) and len(val) == 2
    sample = val[1]
    assert sample["meta"] == {"name": "e", "size": SIZE}
    np.testing.assert_array_equal(sample["semseg"].numpy(), written["e"]["semseg"])
    np.testing.assert_array_equal(sample["depth"][0].numpy(), written["e"]["depth"])
    assert val.info.num_classes == {"semseg": 3}
    assert dataset_info(config).class_names == {"semseg": ["x", "y", "z"]}
    assert bench_size(config) == SIZE
    with pytest.raises(ConfigError, match="data.root"):  # the rules every dataset read from a folder has
        build_dataset(load_config(None, ["data.dataset=toy"]).data, "val", train=False)
    with pytest.raises(DataError, match="no labels for normals"):
        build_dataset(DataConfig(dataset="toy", root=str(tmp_path), tasks=["normals"]), "val", train=False)


def test_the_cli_offers_checks_and_evaluates_a_registered_dataset(
    toy, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    root = tmp_path / "toy"
    written = write_toy(root)
    assert build_parser().parse_args(["data", "check", str(root), "--dataset", "toy"]).dataset == "toy"
    assert main(["data", "check", str(root)]) == 0  # detected by its marker folder
    out = capsys.readouterr().out
    assert f"Toy scenes at {root}" in out and "0 problem(s)" in out
    np.save(root / "depth" / "b.npy", np.full(SIZE, 2500.0, np.float32))  # the depth task's own check
    assert main(["data", "check", str(root), "--dataset", "toy"]) == 1
    assert "depth/b.npy: depth up to 2500.0 m" in capsys.readouterr().out

    (tmp_path / "pred" / "semseg").mkdir(parents=True)
    for name in NAMES["val"]:
        Image.fromarray(written[name]["semseg"].astype(np.uint8)).save(tmp_path / "pred" / "semseg" / f"{name}.png")
    figures = tmp_path / "figures.json"
    argv = ["evaluate", "--predictions", str(tmp_path / "pred"), "--dataset", "toy", "--root", str(root),
            "--out", str(figures)]
    assert main(argv) == 0
    assert json.loads(figures.read_text())["results"]["semseg"]["mIoU"] == pytest.approx(100.0)


def test_unknown_or_unregistered_names_list_the_known_ones(toy, tmp_path: Path, capsys) -> None:
    with pytest.raises(ConfigError, match=r"unknown dataset 'nope' \(known: synthetic, nyud, pascal, toy\)"):
        load_config(None, ["data.dataset=nope"])
    with pytest.raises(ConfigError, match="unknown dataset 'nope'"):
        build_dataset(DataConfig(dataset="nope"), "val", train=False)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["evaluate", "--predictions", "p", "--dataset", "nope"])
    assert "invalid choice: 'nope'" in capsys.readouterr().err
    with pytest.raises(UserError, match="'synthetic' is not read from a folder; data check knows nyud, pascal, toy"):
        check_dataset(tmp_path, dataset="synthetic")
    assert main(["data", "check", str(tmp_path), "--dataset", "synthetic"]) == 2


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["data.dataset=nyud"], "data.root"),
        (["data.dataset=pascal", "data.root=/datasets/pascal"], "data.crop_size"),  # batches need one size
    ],
)
def test_dataset_rules_fail_before_any_file_is_read(overrides: list[str], key: str) -> None:
    config = load_config(None, overrides)  # config validation knows names only, no dataset's rules
    with pytest.raises(ConfigError, match=f"key '{key}'"):
        build_dataset(config.data, "train", train=True)


def test_the_table_is_restored_after_a_registration(toy) -> None:
    DATASETS.unregister("toy")
    assert "toy" not in DATASETS and list(DATASETS) == ["synthetic", "nyud", "pascal"]
    DATASETS.register("toy", ToyDataset)  # for the fixture's teardown


class FlowTask(Task):
    """A toy 2-channel task: horizontal and vertical motion; a left-right flip negates the horizontal one."""

    name: ClassVar[str] = "flow"
    primary_metric: ClassVar[str] = "epe"
    fill_value: ClassVar[float] = 0.0
    target_channels: ClassVar[int] = 2

    @classmethod
    def flip_target(cls, target: torch.Tensor) -> torch.Tensor:
        return target.flip(-1) * torch.tensor([-1.0, 1.0]).view(2, 1, 1)


def test_transforms_convert_resize_flip_and_pad_a_registered_task() -> None:
    TASKS.register("flow", FlowTask)
    try:
        columns = np.tile(np.arange(8, dtype=np.float32), (6, 1))
        raw = {"image": np.zeros((6, 8, 3), np.uint8), "flow": np.stack([np.ones_like(columns), columns]),
               "meta": {"name": "toy"}}
        transform = JointTransform(crop_size=None, scale_range=(2.0, 2.0), flip=True)  # scaled, cropped back
        transform.set_epoch(seed=0, epoch=0)
        seen = set()
        for index in range(12):
            flow = transform(raw, index)["flow"]
            assert flow.shape == (2, 6, 8) and flow.dtype == torch.float32
            flipped = bool(flow[1, 0, 0] > flow[1, 0, -1])
            seen.add(flipped)
            assert torch.all(flow[0] == (-1.0 if flipped else 1.0))
            assert set(flow[1].unique().tolist()) <= set(range(8))  # nearest neighbour keeps values exact
        assert seen == {False, True}
        padded = JointTransform(crop_size=(9, 10), flip=False)(raw, 0)["flow"]
        assert torch.equal(padded[:, :6, :8], torch.from_numpy(raw["flow"]))
        assert torch.all(padded[:, 6:] == 0) and torch.all(padded[:, :, 8:] == 0)  # FlowTask.fill_value
        with pytest.raises(DataError, match=r"target 'flow': expected 2 x H x W"):
            transform({**raw, "flow": columns}, 0)
    finally:
        TASKS.unregister("flow")
