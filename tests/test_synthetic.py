"""The synthetic scenes: labels geometrically consistent, deterministic, smooth clips of three kinds of motion,
neighbouring training frames, cache, export."""

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from densemtl.config import DataConfig, SyntheticConfig
from densemtl.data.export import export_synthetic
from densemtl.data.synthetic import (
    CLASS_NAMES,
    DEPTH_JUMP,
    GENERATOR_VERSION,
    SALIENT_CLASSES,
    SyntheticClips,
    SyntheticDataset,
    cache_path,
    render_clip,
    render_frame,
)
from densemtl.data.synthetic import dataset as synthetic
from densemtl.errors import DataError
from densemtl.tasks import IGNORE_INDEX, build_tasks
from tests.conftest import angles_deg, label_interior, normals_from_depth

FULL = SyntheticConfig()  # the default 96 x 128 frames, for the geometry checks


def _small(tmp_path: Path, **changes) -> SyntheticConfig:
    params = dict(height=24, width=32, num_train=3, num_val=2, num_test=1, num_clips=2, clip_length=4, seed=5,
                  cache_dir=str(tmp_path / "cache"))
    params.update(changes)
    return SyntheticConfig(**params)


@pytest.mark.parametrize("index", [0, 1, 2])
def test_rendered_normals_agree_with_the_depth_map(index):
    frame = render_frame(FULL, "train", index)
    angles = angles_deg(normals_from_depth(frame["depth"]), frame["normals"][:, 1:-1, 1:-1])
    inside = label_interior(frame["instance"].astype(np.int64)) & (frame["edge"][1:-1, 1:-1] == 0)
    assert inside.mean() > 0.7
    assert np.median(angles[inside]) < 1.0
    assert np.mean(angles[inside] < 5.0) > 0.9


def test_labels_have_the_documented_ranges():
    frame = render_frame(FULL, "val", 0)
    assert frame["image"].shape == (96, 128, 3) and frame["image"].dtype == np.uint8
    assert frame["depth"].min() > 0.3 and frame["depth"].max() < 12.0
    assert frame["semseg"].max() < len(CLASS_NAMES)
    np.testing.assert_allclose(np.linalg.norm(frame["normals"], axis=0), 1.0, atol=1e-4)
    np.testing.assert_array_equal(frame["saliency"], np.isin(frame["semseg"], SALIENT_CLASSES))
    assert set(np.unique(frame["edge"])) <= {0, 1}


def test_boundaries_lie_where_labels_or_depth_jump():
    for index in range(3):
        frame = render_frame(FULL, "test", index)
        semseg, instance = frame["semseg"].astype(np.int64), frame["instance"].astype(np.int64)
        depth, edge = frame["depth"], frame["edge"].astype(bool)
        jump = np.zeros(edge.shape, bool)  # pixels with a 4-neighbour across a label change or a depth step
        for axis in (0, 1):
            a = [slice(None)] * 2
            b = [slice(None)] * 2
            a[axis], b[axis] = slice(None, -1), slice(1, None)
            a, b = tuple(a), tuple(b)
            changed = (semseg[a] != semseg[b]) | (instance[a] != instance[b])
            step = np.abs(depth[a] - depth[b]) > DEPTH_JUMP * np.minimum(depth[a], depth[b])
            for side in (a, b):
                jump[side] |= changed | step
            # every label change has one of its two pixels on the boundary
            assert np.all(edge[a][changed] | edge[b][changed])
        assert np.all(jump[edge])
        assert 0.01 < edge.mean() < 0.2


def test_same_seed_same_frames_other_seed_other_frames(tmp_path):
    first, again = render_frame(FULL, "train", 4), render_frame(FULL, "train", 4)
    for key in first:
        np.testing.assert_array_equal(first[key], again[key])
    other_seed = render_frame(SyntheticConfig(seed=1), "train", 4)
    other_index = render_frame(FULL, "train", 5)
    assert not np.array_equal(first["depth"], other_seed["depth"])
    assert not np.array_equal(first["depth"], other_index["depth"])


def test_clip_frames_move_smoothly():
    config = SyntheticConfig(height=48, width=64, clip_length=6)
    clips = [render_clip(config, index) for index in range(2)]
    depths = np.stack([frame["depth"] for frame in clips[0]])
    step = np.abs(np.diff(depths, axis=0)).mean()
    across = np.abs(clips[0][0]["depth"] - clips[1][0]["depth"]).mean()
    start_to_end = np.abs(clips[0][0]["depth"] - clips[0][-1]["depth"]).mean()
    assert 0 < step < 0.25 * across
    assert step < start_to_end  # the camera really moves along the clip
    assert len({frame["semseg"].tobytes() for frame in clips[0]}) == 6


def test_dataset_caches_once_and_reads_back(tmp_path, monkeypatch):
    config = DataConfig(tasks=["semseg", "depth", "normals", "edge", "saliency"],
                        synthetic=_small(tmp_path))
    dataset = SyntheticDataset(config, "val", train=False)
    path = cache_path(config.synthetic, "val")
    assert path.is_file() and len(dataset) == 2
    assert dataset.info.num_classes == {"semseg": len(CLASS_NAMES)}
    assert dataset.info.class_names["semseg"] == list(CLASS_NAMES)

    def fail(*args, **kwargs):
        raise AssertionError("regenerated although cached")

    monkeypatch.setattr(synthetic, "_generate", fail)
    cached = SyntheticDataset(config, "val", train=False)
    frame = render_frame(config.synthetic, "val", 1)
    sample = cached[1]
    assert sample["meta"] == {"name": "val_00001", "size": (24, 32)}
    assert sample["image"].shape == (3, 24, 32) and sample["image"].dtype == torch.float32
    np.testing.assert_array_equal(sample["semseg"].numpy(), frame["semseg"])
    np.testing.assert_array_equal(sample["depth"][0].numpy(), frame["depth"])
    np.testing.assert_array_equal(sample["normals"].numpy(), frame["normals"])
    assert sample["edge"].shape == (1, 24, 32) and sample["saliency"].dtype == torch.float32
    assert not list(path.parent.glob("*.tmp"))


def test_training_samples_are_augmented_to_the_crop(tmp_path):
    config = DataConfig(tasks=["semseg", "depth"], crop_size=[20, 28], scale_range=[0.8, 1.3],
                        synthetic=_small(tmp_path))
    sample = SyntheticDataset(config, "train", train=True)[0]
    assert sample["image"].shape == (3, 20, 28) and sample["semseg"].shape == (20, 28)
    assert set(sample) == {"image", "semseg", "depth", "meta"}


def test_clip_dataset_returns_consecutive_frames(tmp_path):
    config = DataConfig(tasks=["semseg", "depth"], synthetic=_small(tmp_path))
    clips = SyntheticClips(config)
    frames = clips[1]
    assert len(clips) == 2 and len(frames) == 4
    assert [frame["meta"]["frame"] for frame in frames] == [0, 1, 2, 3]
    np.testing.assert_array_equal(frames[2]["depth"][0].numpy(), render_clip(config.synthetic, 1)[2]["depth"])


def test_cache_key_covers_the_generation_parameters(tmp_path):
    base = _small(tmp_path)
    keys = {cache_path(base, "train")}
    for change in ({"height": 25}, {"width": 33}, {"seed": 6}, {"num_train": 4}):
        keys.add(cache_path(_small(tmp_path, **change), "train"))
    assert len(keys) == 5
    assert cache_path(_small(tmp_path, num_val=7), "train") == cache_path(base, "train")
    assert cache_path(_small(tmp_path, clip_length=5), "clips") != cache_path(base, "clips")
    assert cache_path(_small(tmp_path, motion="slow_camera"), "clips") != cache_path(base, "clips")
    assert cache_path(_small(tmp_path, motion="slow_camera"), "train") == cache_path(base, "train")
    with_neighbours = _small(tmp_path, neighbour_offsets=[-1, 1])
    assert cache_path(with_neighbours, "train") != cache_path(base, "train")
    assert cache_path(with_neighbours, "val") == cache_path(base, "val")


def _mean_step(frames: list[dict], key: str) -> float:
    return float(np.mean([np.abs(a[key].astype(np.float32) - b[key].astype(np.float32)).mean()
                          for a, b in zip(frames, frames[1:], strict=False)]))


def test_clip_kinds_move_as_named():
    """A slow camera changes the view less than the default one; a static camera keeps the room still and
    moves a few objects (the floor and walls do not change between frames)."""
    config = SyntheticConfig(height=48, width=64, clip_length=5, seed=2)
    kinds = {kind: [render_clip(SyntheticConfig(**{**config.__dict__, "motion": kind}), index) for index in range(3)]
             for kind in ("camera", "slow_camera", "static_camera")}
    for index in range(3):
        camera, slow, static = (kinds[k][index] for k in ("camera", "slow_camera", "static_camera"))
        assert 0 < _mean_step(slow, "depth") < _mean_step(camera, "depth")
        moved = np.stack([a["semseg"] != b["semseg"] for a, b in zip(static, static[1:], strict=False)])
        room = np.isin(static[0]["semseg"], [CLASS_NAMES.index(n) for n in ("floor", "wall", "ceiling")])
        assert 0 < moved.mean() < 0.1
        still = ~moved.any(axis=0) & room
        np.testing.assert_array_equal(static[0]["depth"][still], static[-1]["depth"][still])
    mixed = SyntheticConfig(**{**config.__dict__, "motion": "mixed"})
    for index, kind in enumerate(("camera", "slow_camera", "static_camera")):
        np.testing.assert_array_equal(render_clip(mixed, index)[1]["image"], kinds[kind][index][1]["image"])


def test_training_frames_carry_a_neighbour_augmented_alike(tmp_path):
    synthetic_config = _small(tmp_path, height=48, width=64, num_train=4, neighbour_offsets=[-2, -1, 1],
                              motion="slow_camera")
    config = DataConfig(tasks=["semseg"], crop_size=[40, 56], scale_range=[0.8, 1.3], flip=True,
                        synthetic=synthetic_config)
    dataset = SyntheticDataset(config, "train", train=True)
    assert dataset.arrays["neighbours"].shape == (4, 3, 48, 64, 3)
    dataset.transform.set_epoch(0, 0)
    offsets, flips = set(), []
    for epoch in range(6):
        dataset.transform.set_epoch(0, epoch)
        for index in range(len(dataset)):
            sample = dataset[index]
            again = dataset[index]
            assert torch.equal(sample["neighbour"], again["neighbour"])  # a function of (seed, epoch, index)
            assert sample["neighbour"].shape == sample["image"].shape == (3, 40, 56)
            offsets.add(sample["meta"]["neighbour_offset"])
            near = (sample["neighbour"] - sample["image"]).abs().mean()
            flips.append(float(near) < float((sample["neighbour"].flip(-1) - sample["image"]).abs().mean()))
    assert offsets == {-2, -1, 1}
    assert all(flips)  # the same crop and flip: a neighbour is closer to its frame than its mirror image
    assert "neighbour" not in SyntheticDataset(config, "val", train=False)[0]


def test_unwritable_cache_dir_is_a_data_error(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    config = DataConfig(synthetic=_small(tmp_path, cache_dir=str(blocker / "cache")))
    with pytest.raises(DataError, match="a_file"):
        SyntheticDataset(config, "train", train=False)


def test_unknown_task_or_split_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="human_parts"):
        SyntheticDataset(DataConfig(tasks=["human_parts"], synthetic=_small(tmp_path)), "train", train=False)
    with pytest.raises(DataError, match="bogus"):
        SyntheticDataset(DataConfig(synthetic=_small(tmp_path)), "bogus", train=False)
    with pytest.raises(DataError, match="empty"):
        SyntheticDataset(DataConfig(synthetic=_small(tmp_path, num_test=0)), "test", train=False)


def test_export_writes_the_nyud_layout(tmp_path):
    config = _small(tmp_path)
    out = export_synthetic(config, tmp_path / "export", grid=True)
    assert (out / "gt_sets" / "train.txt").read_text().split() == ["train_00000", "train_00001", "train_00002"]
    assert (out / "classes.txt").read_text().split() == list(CLASS_NAMES)
    frame = render_frame(config, "val", 1)
    tasks = build_tasks(["semseg", "depth", "normals", "edge", "saliency"], synthetic.synthetic_info())
    segmentation = tasks["semseg"].load(out / "segmentation" / "val_00001.png").numpy()
    np.testing.assert_array_equal(segmentation, frame["semseg"].astype(np.int64) + 1)  # 0 = void in the files
    np.testing.assert_array_equal(tasks["depth"].load(out / "depth" / "val_00001.npy")[0].numpy(), frame["depth"])
    normals = tasks["normals"].load(out / "normals" / "val_00001.png").numpy()
    np.testing.assert_allclose(normals, frame["normals"], atol=1.01 / 255)
    for name in ("edge", "saliency"):
        np.testing.assert_array_equal(tasks[name].load(out / name / "val_00001.png")[0].numpy(), frame[name])
    grid = np.asarray(Image.open(out / "grid.png"))
    assert grid.shape == (2 * 24 + 2, 6 * 32 + 5 * 2, 3)
    assert IGNORE_INDEX not in segmentation


# First 16 hex digits of the sha256 of every array (dtype, shape and bytes) of two small frames, as rendered
# by generator version 3 before data/synthetic.py was split into a package. A change to the generator that
# alters any array must bump GENERATOR_VERSION (so stale caches are not read) and update these digests.
PINNED_VERSION = 3
PINNED_FRAME = {  # render_frame(PIN_CONFIG, "train", 0)
    "image": "b150d71c3c528e09", "semseg": "eeabef58f5195c0a", "depth": "741cc9859b39ad83",
    "normals": "be5f577555ca0d31", "edge": "8889a7a71c3fcce2", "saliency": "9928981162779f82",
    "instance": "c7d1191d656384d5",
}
PINNED_CLIP_FRAME = {  # render_clip(PIN_CONFIG, 1)[2]
    "image": "53373efbaed94f02", "semseg": "6a1c55838f0f6158", "depth": "38b3e037baaa6f15",
    "normals": "8cfd76a1bd262661", "edge": "39a3dc5750abfbf2", "saliency": "8e51559d31f6ebae",
    "instance": "bd64a98fbfb2c315",
}
PIN_CONFIG = SyntheticConfig(height=24, width=32, seed=5, clip_length=3)


def _digests(frame: dict) -> dict[str, str]:
    def digest(array: np.ndarray) -> str:
        array = np.ascontiguousarray(array)
        return hashlib.sha256(f"{array.dtype.str}{array.shape}".encode() + array.tobytes()).hexdigest()[:16]

    return {key: digest(value) for key, value in frame.items()}


def test_rendered_frames_are_pinned_to_the_generator_version():
    assert GENERATOR_VERSION == PINNED_VERSION
    assert _digests(render_frame(PIN_CONFIG, "train", 0)) == PINNED_FRAME
    assert _digests(render_clip(PIN_CONFIG, 1)[2]) == PINNED_CLIP_FRAME
