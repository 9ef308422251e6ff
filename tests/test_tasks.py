"""The task registry: losses ignore what they must, predictions and encodings round-trip."""

import numpy as np
import pytest
import torch

from densemtl.dataset_info import DatasetInfo
from densemtl.errors import DataError
from densemtl.tasks import IGNORE_INDEX, TASKS, build_tasks, decode_normals, encode_normals

INFO = DatasetInfo(name="toy", tasks=tuple(TASKS), num_classes={"semseg": 5, "human_parts": 7})


def _targets(height=6, width=8):
    generator = torch.Generator().manual_seed(0)
    semseg = torch.randint(0, 5, (2, height, width), generator=generator)
    semseg[:, 0] = IGNORE_INDEX
    depth = torch.rand(2, 1, height, width, generator=generator) + 0.5
    depth[:, :, 1] = 0
    normals = torch.nn.functional.normalize(torch.randn(2, 3, height, width, generator=generator), dim=1)
    normals[:, :, 2] = 0
    edge = (torch.rand(2, 1, height, width, generator=generator) > 0.8).float()
    edge[:, :, 3] = IGNORE_INDEX
    return {
        "semseg": semseg,
        "human_parts": semseg.clone(),
        "depth": depth,
        "normals": normals,
        "edge": edge,
        "saliency": edge.clone(),
    }


def test_every_task_has_a_loss_that_ignores_invalid_pixels():
    tasks = build_tasks(list(TASKS), INFO)
    targets = _targets()
    generator = torch.Generator().manual_seed(1)
    for name, task in tasks.items():
        raw = torch.randn(2, task.channels, 6, 8, generator=generator, requires_grad=True)
        loss = task.loss(raw, targets[name])
        assert loss.ndim == 0 and torch.isfinite(loss), name
        loss.backward()
        # the row of invalid pixels receives no gradient
        invalid_row = {"semseg": 0, "human_parts": 0, "depth": 1, "normals": 2, "edge": 3, "saliency": 3}[name]
        assert raw.grad[:, :, invalid_row].abs().sum() == 0, name
        assert raw.grad.abs().sum() > 0, name


def test_perfect_predictions_have_lower_loss_than_wrong_ones():
    tasks = build_tasks(["semseg", "depth", "normals", "edge"], INFO)
    targets = _targets()
    semseg = targets["semseg"].clamp(max=4)
    perfect = torch.nn.functional.one_hot(semseg, 5).permute(0, 3, 1, 2).float() * 20
    assert tasks["semseg"].loss(perfect, targets["semseg"]) < 1e-3
    assert tasks["depth"].loss(targets["depth"], targets["depth"]) == 0
    assert tasks["normals"].loss(targets["normals"] * 3, targets["normals"]) < 1e-5
    assert tasks["normals"].loss(-targets["normals"], targets["normals"]) > 1
    edge_logits = torch.where(targets["edge"] > 0, 10.0, -10.0)
    assert tasks["edge"].loss(edge_logits, targets["edge"]) < 1e-3


def test_edge_loss_weights_positives_by_095():
    task = build_tasks(["edge"], INFO)["edge"]
    target = torch.tensor([[[[1.0, 0.0]]]])
    raw = torch.zeros(1, 1, 1, 2)
    # both pixels have BCE log(2); weights 0.95 and 0.05, mean over the 2 valid pixels
    assert task.loss(raw, target).item() == pytest.approx(np.log(2) * (0.95 + 0.05) / 2)


def test_all_ignored_target_gives_zero_loss_with_gradient():
    task = build_tasks(["semseg"], INFO)["semseg"]
    raw = torch.randn(1, 5, 4, 4, requires_grad=True)
    loss = task.loss(raw, torch.full((1, 4, 4), IGNORE_INDEX))
    loss.backward()
    assert loss.item() == 0 and raw.grad is not None


def test_saved_predictions_load_back(tmp_path):
    tasks = build_tasks(list(TASKS), INFO)
    targets = _targets()
    for name, task in tasks.items():
        raw = torch.randn(1, task.channels, 6, 8)
        prediction = task.predict(raw)[0]
        path = task.save(prediction, tmp_path / f"{name}_0001")
        loaded = task.load(path)
        assert task.find_file(tmp_path, f"{name}_0001") == path
        if name in ("edge", "saliency", "normals"):
            assert torch.allclose(loaded.reshape(prediction.shape), prediction, atol=1 / 127)
        else:
            assert torch.equal(loaded.reshape(prediction.shape).to(prediction.dtype), prediction)
        picture = task.colorize(targets[name][0])
        assert picture.shape == (6, 8, 3) and picture.dtype == np.uint8


def test_normals_encoding_keeps_invalid_pixels():
    normals = np.zeros((3, 2, 2), dtype=np.float32)
    normals[:, 0, 0] = (0, 0, 1)
    decoded = decode_normals(encode_normals(normals))
    assert np.allclose(decoded[:, 0, 0], (0, 0, 1), atol=1 / 127)
    assert (decoded[:, 1, 1] == 0).all()


def test_unknown_task_and_missing_file(tmp_path):
    with pytest.raises(DataError, match="unknown task"):
        build_tasks(["sky"], INFO)
    task = build_tasks(["depth"], INFO)["depth"]
    with pytest.raises(DataError, match="no depth prediction"):
        task.find_file(tmp_path, "missing")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="bad.png"):
        build_tasks(["edge"], INFO)["edge"].load(tmp_path / "bad.png")
