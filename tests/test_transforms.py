"""Joint transforms keep the image and every label aligned, pad with the right values, keep labels exact."""

import numpy as np
import pytest
import torch

from densemtl.config import DataConfig, SyntheticConfig
from densemtl.data.synthetic import render_frame
from densemtl.data.transforms import (
    JointTransform,
    build_transform,
    denormalize_image,
    pad_to,
    to_tensor_sample,
)
from densemtl.errors import DataError
from densemtl.tasks import IGNORE_INDEX, class_palette
from tests.conftest import angles_deg, label_interior, normals_from_depth

FRAME = SyntheticConfig(height=48, width=64)
_PALETTE = class_palette(256)
_NORMAL_OF = np.array([[0, 0, 1], [1, 0, 0], [0, 1, 0], [-0.6, 0, 0.8], [0, -0.8, 0.6], [0.8, 0.6, 0]], np.float32)


def _raw(frame: dict) -> dict:
    sample = {key: frame[key] for key in ("image", "semseg", "depth", "normals", "edge", "saliency")}
    sample["semseg"] = sample["semseg"].astype(np.int64)
    sample["meta"] = {"name": "frame"}
    return sample


def _labelled_sample(height: int = 40, width: int = 52) -> dict:
    """A sample where every label is a function of the class: image colour, depth, normal, saliency."""
    rng = np.random.default_rng(0)
    semseg = np.zeros((height, width), np.int64)
    for label in range(1, 6):
        top, left = rng.integers(0, height - 10), rng.integers(0, width - 10)
        semseg[top : top + rng.integers(8, 20), left : left + rng.integers(8, 25)] = label
    return {
        "image": _PALETTE[semseg + 1],
        "semseg": semseg,
        "depth": (1.0 + semseg + 0.001 * np.arange(width)).astype(np.float32),  # a ramp to the right
        "normals": _NORMAL_OF[semseg].transpose(2, 0, 1),
        "saliency": (semseg % 2).astype(np.float32),
        "meta": {"name": "toy"},
    }


def test_tensor_sample_has_the_contract_format():
    sample = to_tensor_sample(_raw(render_frame(FRAME, "train", 0)))
    assert sample["image"].shape == (3, 48, 64) and sample["image"].dtype == torch.float32
    assert sample["semseg"].dtype == torch.int64 and sample["semseg"].shape == (48, 64)
    for name, channels in (("depth", 1), ("normals", 3), ("edge", 1), ("saliency", 1)):
        assert sample[name].shape == (channels, 48, 64) and sample[name].dtype == torch.float32
    assert sample["meta"] == {"name": "frame", "size": (48, 64)}
    np.testing.assert_array_equal(denormalize_image(sample["image"]), render_frame(FRAME, "train", 0)["image"])


@pytest.mark.parametrize("seed", range(6))
def test_random_scale_crop_flip_keep_every_label_aligned(seed):
    transform = JointTransform(crop_size=(32, 40), scale_range=(0.7, 1.6), flip=True)
    raw = _labelled_sample()
    out = transform(raw, torch.Generator().manual_seed(seed))
    semseg = out["semseg"].numpy()
    valid = semseg != IGNORE_INDEX
    inside = np.pad(label_interior(semseg), 1) & valid  # away from label borders, where bilinear blends colours
    assert inside.sum() > 200
    colours = denormalize_image(out["image"]).astype(int)
    assert np.abs(colours[inside] - _PALETTE[semseg[inside] + 1]).max() <= 2
    depth = out["depth"][0].numpy()
    np.testing.assert_allclose(depth[inside], 1.0 + semseg[inside], atol=0.06)
    ramp = np.diff(depth, axis=1)[inside[:, 1:] & inside[:, :-1]]
    flipped = np.median(ramp) < 0  # the depth ramp tells whether this sample was flipped
    np.testing.assert_array_equal(out["saliency"][0].numpy()[valid], semseg[valid] % 2)
    normals = out["normals"].numpy()[:, inside]
    expected = _NORMAL_OF[semseg[inside]].T
    mirrored = expected * np.array([[-1.0], [1.0], [1.0]], np.float32)  # a horizontal flip negates x
    np.testing.assert_allclose(normals, mirrored if flipped else expected, atol=1e-6)


def test_flip_happens_about_half_the_time_and_matches_the_flipped_geometry():
    raw = _raw(render_frame(SyntheticConfig(), "train", 3))
    transform = JointTransform(crop_size=None, flip=True)
    flips = 0
    for seed in range(12):
        out = transform(raw, torch.Generator().manual_seed(seed))
        depth = out["depth"][0].numpy()
        is_flipped = np.array_equal(depth, raw["depth"][:, ::-1])
        assert is_flipped or np.array_equal(depth, raw["depth"])
        flips += is_flipped
        if is_flipped:
            np.testing.assert_array_equal(out["semseg"].numpy(), raw["semseg"][:, ::-1])
            # the flipped normal map is the normal map of the flipped depth map
            angles = angles_deg(normals_from_depth(depth), out["normals"].numpy()[:, 1:-1, 1:-1])
            inside = label_interior(out["semseg"].numpy()) & (out["edge"][0, 1:-1, 1:-1].numpy() == 0)
            sideways = inside & (np.abs(out["normals"][0, 1:-1, 1:-1].numpy()) > 0.3)
            assert sideways.sum() > 100
            assert np.median(angles[sideways]) < 5.0
            # ... while mirroring the map without negating x does not
            mirrored = raw["normals"][:, 1:-1, 1:-1][:, :, ::-1]
            assert np.median(angles_deg(normals_from_depth(depth), mirrored)[sideways]) > 30.0
    assert 2 <= flips <= 10


def test_padding_uses_each_fill_value():
    raw = _raw(render_frame(SyntheticConfig(height=20, width=30), "val", 0))
    out = JointTransform(crop_size=(32, 40), flip=False)(raw)
    assert out["image"].shape == (3, 32, 40)
    pad_rows, pad_cols = (slice(20, None), slice(None)), (slice(None), slice(30, None))
    for region in (pad_rows, pad_cols):
        assert torch.all(out["semseg"][region] == IGNORE_INDEX)
        assert torch.all(out["edge"][0][region] == IGNORE_INDEX)
        assert torch.all(out["saliency"][0][region] == IGNORE_INDEX)
        assert torch.all(out["depth"][0][region] == 0)
        assert torch.all(out["normals"][(slice(None), *region)] == 0)
        assert torch.all(out["image"][(slice(None), *region)] == 0)
    np.testing.assert_array_equal(out["semseg"][:20, :30].numpy(), raw["semseg"])
    assert out["meta"]["size"] == (20, 30)


def test_pad_to_keeps_the_original_size_and_rejects_shrinking():
    sample = to_tensor_sample(_raw(render_frame(SyntheticConfig(height=20, width=30), "val", 1)))
    padded = pad_to(sample, (24, 32))
    assert padded["image"].shape == (3, 24, 32) and padded["normals"].shape == (3, 24, 32)
    assert padded["meta"]["size"] == (20, 30)
    assert torch.equal(padded["depth"][:, :20, :30], sample["depth"]) and torch.all(padded["depth"][:, 20:] == 0)
    assert torch.all(padded["semseg"][:, 30:] == IGNORE_INDEX)
    assert torch.all(pad_to(sample, (24, 32), {"semseg": 7})["semseg"][20:] == 7)
    with pytest.raises(DataError, match="smaller"):
        pad_to(sample, (16, 32))


def test_depth_resize_never_blends_valid_and_invalid_values():
    depth = np.full((30, 40), 4.0, np.float32)
    depth[:, :13] = 0.0  # no measurement on the left
    depth[10:20, 20:30] = 2.0
    raw = {"image": np.zeros((30, 40, 3), np.uint8), "depth": depth, "semseg": np.zeros((30, 40), np.int64)}
    for scale in (0.53, 1.37):
        size = (round(30 * scale), round(40 * scale))  # crop = scaled size: no random offset
        out = JointTransform(crop_size=size, scale_range=(scale, scale), flip=False)(raw)["depth"][0].numpy()
        values = out[out > 0]
        assert values.min() >= 2.0 - 1e-5 and values.max() <= 4.0 + 1e-5
        edge = 13 * scale  # the border of the measured region, in output pixels
        assert np.all(out[:, : int(edge) - 1] == 0) and np.all(out[:, int(edge) + 2 :] > 0)


def test_label_maps_stay_exact_under_scaling():
    raw = _labelled_sample()
    out = JointTransform(crop_size=(40, 52), scale_range=(0.6, 0.6), flip=False)(raw)
    assert set(np.unique(out["semseg"].numpy())) <= set(np.unique(raw["semseg"])) | {IGNORE_INDEX}
    normals = out["normals"].numpy()
    norms = np.linalg.norm(normals, axis=0)
    assert np.all((np.abs(norms - 1) < 1e-5) | (norms == 0))


def test_build_transform_follows_the_data_config():
    config = DataConfig(crop_size=[16, 24], scale_range=[1.0, 1.5], flip=False)
    raw = _labelled_sample()
    train = build_transform(config, train=True)(raw)
    assert train["image"].shape == (3, 16, 24)
    val = build_transform(config, train=False)(raw)
    assert val["image"].shape == (3, 40, 52)


def test_bad_samples_are_data_errors():
    raw = _labelled_sample()
    with pytest.raises(DataError, match="unknown_map"):
        to_tensor_sample({**raw, "unknown_map": raw["depth"]})
    with pytest.raises(DataError, match="normals"):
        to_tensor_sample({**raw, "normals": raw["normals"][:2]})
    with pytest.raises(DataError, match="size"):
        to_tensor_sample({**raw, "depth": raw["depth"][:-1]})
    with pytest.raises(DataError, match="H x W x 3"):
        to_tensor_sample({**raw, "image": raw["image"][..., 0]})
