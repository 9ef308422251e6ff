"""``predict_images``: each task's map in its on-disk encoding, read back equal to the in-memory output."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from densemtl.cli import main
from densemtl.data import build_dataset
from densemtl.data.transforms import normalize_image
from densemtl.engine.checkpoint import load_model
from densemtl.engine.evaluate import evaluate_model, evaluate_predictions
from densemtl.engine.predict import predict_images, read_image
from densemtl.errors import DataError, UserError
from tests.conftest import make_trainer, tiny_config


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[Path]]:
    """A 2-step checkpoint and two validation frames written as PNG files (one of another size)."""
    tmp = tmp_path_factory.mktemp("predict")
    config = tiny_config(tmp, "train.steps=2", "data.tasks=[semseg,depth,normals,edge,saliency]")
    make_trainer(config).fit()
    frames = build_dataset(config.data, "val", train=False).arrays["image"]
    images = [tmp / "frame_a.png", tmp / "frame_b.jpg"]
    Image.fromarray(frames[0]).save(images[0])
    Image.fromarray(frames[1][:29, :41]).save(images[1], quality=95)  # odd size, another format
    return Path(config.out_dir) / "checkpoints" / "last.pt", tmp, images


def test_predict_then_evaluate_predictions_scores_like_in_memory_evaluation(
    trained: tuple[Path, Path, list[Path]],
) -> None:
    """The CLI path (`predict` on image files, then `evaluate --predictions`) against `evaluate_model`."""
    checkpoint, tmp, _ = trained
    loaded = load_model(checkpoint)
    val = build_dataset(loaded.config.data, "val", train=False)
    images = []
    for index in range(len(val)):  # the frames as PNG files named like the dataset's samples
        images.append(tmp / "val_png" / f"{val[index]['meta']['name']}.png")
        images[-1].parent.mkdir(exist_ok=True)
        Image.fromarray(val.arrays["image"][index]).save(images[-1])
    predict_images(checkpoint, images, tmp / "val_pred", device="cpu")
    names = ["semseg", "depth", "normals"]
    from_disk = evaluate_predictions(
        tmp / "val_pred", "synthetic", None, split="val", tasks=names, synthetic=loaded.config.data.synthetic
    )
    in_memory = evaluate_model(loaded.model, val, {n: loaded.tasks[n] for n in names}, loaded.config)
    assert from_disk["semseg"] == pytest.approx(in_memory["semseg"], abs=1e-9)  # class ids: lossless
    assert from_disk["depth"] == pytest.approx(in_memory["depth"], rel=1e-5)  # float32 .npy: lossless
    assert from_disk["normals"]["mean"] == pytest.approx(in_memory["normals"]["mean"], abs=0.5)  # 8-bit PNG
    # the command line takes the synthetic scenes' settings from a config (here the run's own)
    argv = ["evaluate", "--predictions", str(tmp / "val_pred"), "--dataset", "synthetic", "--tasks", *names,
            "--data", str(checkpoint.parents[1] / "config.yaml"), "--out", str(tmp / "cli.json")]
    assert main(argv) == 0
    assert json.loads((tmp / "cli.json").read_text())["results"] == from_disk


def test_predictions_are_written_and_read_back_as_computed(trained: tuple[Path, Path, list[Path]]) -> None:
    checkpoint, tmp, images = trained
    out = tmp / "out"
    written = predict_images(checkpoint, images, out, device="cpu")
    loaded = load_model(checkpoint)
    assert len(written) == len(images) * (len(loaded.tasks) + 1)
    for path in images:
        rgb = np.array(Image.open(path).convert("RGB"))
        with torch.no_grad():
            raw = loaded.model(normalize_image(rgb)[None])["pred"]
        for name, task in loaded.tasks.items():
            expected = task.predict(raw[name])[0]
            back = task.load(task.find_file(out / name, path.stem))
            assert back.shape[-2:] == rgb.shape[:2], f"{name} map of {path.name} has the wrong size"
            if name == "semseg":
                assert torch.equal(back, expected)
            elif name == "depth":
                assert torch.allclose(back, expected, atol=1e-6)
            elif name == "normals":  # 8-bit encoding: about 1/127 per component
                assert (back - expected).abs().max() < 0.01
            else:  # probabilities in 8-bit PNGs
                assert (back - expected).abs().max() <= 0.5 / 255 + 1e-6
        panel = np.array(Image.open(out / "panels" / f"{path.stem}.png"))
        assert panel.shape == (rgb.shape[0], rgb.shape[1] * (len(loaded.tasks) + 1), 3)
        assert np.array_equal(panel[:, : rgb.shape[1]], rgb)


def test_bad_inputs_are_named(trained: tuple[Path, Path, list[Path]], tmp_path: Path) -> None:
    checkpoint, _, images = trained
    with pytest.raises(DataError, match="missing.png: image not found"):
        predict_images(checkpoint, [tmp_path / "missing.png"], tmp_path / "out", device="cpu")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    with pytest.raises(DataError, match="broken.png: cannot read image"):
        predict_images(checkpoint, [broken], tmp_path / "out", device="cpu")
    twin = tmp_path / "frame_a.jpg"
    twin.write_bytes(images[0].read_bytes())
    with pytest.raises(UserError, match="frame_a"):
        predict_images(checkpoint, [images[0], twin], tmp_path / "out", device="cpu")
    with pytest.raises(UserError, match="nothing.pt: checkpoint not found"):
        predict_images(tmp_path / "nothing.pt", images, tmp_path / "out", device="cpu")
    with pytest.raises(DataError, match="a folder, not an image \\(add --video to predict its frames in order\\)"):
        predict_images(checkpoint, [tmp_path], tmp_path / "out", device="cpu")


def test_cli_predict_says_what_it_wrote_and_refuses_stray_settings(trained, tmp_path: Path, capsys) -> None:
    checkpoint, _, images = trained
    assert main(["predict", "--checkpoint", str(checkpoint), str(images[0]), "--out", str(tmp_path / "out")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == (f"predictions of 1 image(s) written to {tmp_path / 'out'} "
                         "(semseg, depth, normals, edge, saliency, panels)")
    with pytest.raises(SystemExit) as info:
        main(["predict", "--checkpoint", str(checkpoint), str(images[0]), "sharing.keyframe_interval=2",
              "--out", str(tmp_path / "o2")])
    assert info.value.code == 2
    assert "'predict' reads no key=value settings: sharing.keyframe_interval=2" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()


def test_exif_orientation_is_honoured(trained: tuple[Path, Path, list[Path]], tmp_path: Path) -> None:
    """A phone picture stored sideways with orientation 6 (turn 90 degrees clockwise) is predicted upright."""
    checkpoint, _, images = trained
    upright = np.array(Image.open(images[0]).convert("RGB"))  # 32 x 48
    stored = np.ascontiguousarray(np.rot90(upright, k=1))  # as the camera wrote it: 48 x 32
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tmp_path / "phone.png", exif=exif)
    assert np.array_equal(read_image(tmp_path / "phone.png"), upright)
    predict_images(checkpoint, [tmp_path / "phone.png"], tmp_path / "out", device="cpu")
    assert np.load(tmp_path / "out" / "depth" / "phone.npy").shape == upright.shape[:2]


def test_16_bit_grey_images_are_scaled_to_8_bits(trained: tuple[Path, Path, list[Path]], tmp_path: Path) -> None:
    checkpoint, _, _ = trained
    grey = (np.arange(32 * 48).reshape(32, 48) * 42).astype(np.uint16)  # 0 .. 64470
    Image.fromarray(grey).save(tmp_path / "grey16.png")
    rgb = read_image(tmp_path / "grey16.png")
    expected = np.rint(grey / 257.0).astype(np.uint8)
    assert rgb.shape == (32, 48, 3) and all(np.array_equal(rgb[..., c], expected) for c in range(3))
    assert rgb.max() == 251 and len(np.unique(rgb)) > 200  # scaled, not clipped at 255
    predict_images(checkpoint, [tmp_path / "grey16.png"], tmp_path / "out", device="cpu")
    assert np.array_equal(np.array(Image.open(tmp_path / "out" / "panels" / "grey16.png"))[:, :48], rgb)
