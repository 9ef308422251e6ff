"""Video prediction with computation reuse across tasks and frames."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from densemtl.config import to_dict
from densemtl.data.transforms import normalize_image
from densemtl.engine.checkpoint import info_to_dict, save_checkpoint
from densemtl.engine.video import list_frames, predict_video, run_video
from densemtl.errors import DataError
from densemtl.models.sharing.inference import SharedInference
from tests.conftest import tiny_model


def write_frames(folder: Path, count: int, static: bool = False) -> list[Path]:
    """A smooth random texture panned one pixel per frame (or not at all)."""
    rng = np.random.default_rng(0)
    texture = rng.uniform(0, 255, (9, 13, 3))
    big = np.array(Image.fromarray(texture.astype(np.uint8)).resize((96, 64), Image.BILINEAR))
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        shift = 0 if static else index
        frame = big[10:42, 10 + shift : 58 + shift]
        paths.append(folder / f"frame{index:03d}.png")
        Image.fromarray(frame).save(paths[-1])
    return paths


def images(paths: list[Path]) -> list[torch.Tensor]:
    return [normalize_image(np.array(Image.open(p).convert("RGB")))[None] for p in paths]


def save_tiny_checkpoint(path: Path) -> Path:
    from densemtl.config import load_config
    from densemtl.data.synthetic import synthetic_info
    from tests.conftest import TINY

    model = tiny_model()
    config = load_config(None, TINY)
    state = {"config": to_dict(config), "info": info_to_dict(synthetic_info()), "model": model.state_dict(), "step": 0}
    return save_checkpoint(path, state)


def test_keyframe_interval_one_equals_per_frame(tmp_path: Path) -> None:
    paths = write_frames(tmp_path / "frames", 4)
    checkpoint = save_tiny_checkpoint(tmp_path / "model.pt")
    report = predict_video(checkpoint, tmp_path / "frames", tmp_path / "out", keyframe_interval=1)
    assert report["frames"] == 4 and all(r["keyframe"] for r in report["per_frame"])
    model = tiny_model()
    inference = SharedInference(model, model.sharing.threshold)
    for path, image in zip(paths, images(paths), strict=True):
        single = inference.run(image)
        saved = np.load(tmp_path / "out" / "depth" / f"{path.stem}.npy")
        np.testing.assert_allclose(saved, single.pred["depth"][0, 0].numpy(), rtol=1e-5, atol=1e-5)
        labels = np.array(Image.open(tmp_path / "out" / "semseg" / f"{path.stem}.png"))
        assert np.array_equal(labels, single.pred["semseg"].argmax(1)[0].numpy())
    written = json.loads((tmp_path / "out" / "video_report.json").read_text())
    assert written["keyframe_interval"] == 1 and len(written["per_frame"]) == 4


@pytest.mark.parametrize("mode", ["element", "token"])
def test_zero_thresholds_reuse_across_frames_equals_dense(tmp_path: Path, mode: str) -> None:
    frames = images(write_frames(tmp_path / "frames", 5))
    model = tiny_model()
    inference = SharedInference(model, threshold=0.0, temporal_threshold=0.0, video_task_layers=1, mode=mode)
    results = [result for result, _ in run_video(inference, frames, keyframe_interval=3)]
    for image, result in zip(frames, results, strict=True):
        dense = inference.dense(image)
        for task in model.tasks:
            torch.testing.assert_close(result.pred[task], dense.pred[task], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", ["element", "token"])
def test_static_video_reuses_everything_between_keyframes(tmp_path: Path, mode: str) -> None:
    frames = images(write_frames(tmp_path / "frames", 3, static=True))
    model = tiny_model()
    inference = SharedInference(model, threshold=0.15, temporal_threshold=0.15, mode=mode)
    results = [result for result, _ in run_video(inference, frames, keyframe_interval=10)]
    for result in results[1:]:
        assert result.recomputed[model.base_task] == 0.0
        assert sum(result.flops.values()) < sum(results[0].flops.values())
        for task in model.tasks:
            assert torch.equal(result.pred[task], results[0].pred[task])


def test_bad_frame_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not a folder"):
        list_frames(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no frames"):
        list_frames(tmp_path / "empty")


def test_cli_predict_video(tmp_path: Path) -> None:
    from densemtl.cli import main

    write_frames(tmp_path / "frames", 3)
    checkpoint = save_tiny_checkpoint(tmp_path / "model.pt")
    code = main(["predict", "--checkpoint", str(checkpoint), str(tmp_path / "frames"), "--out", str(tmp_path / "out"),
                 "--video"])
    assert code == 0
    report = json.loads((tmp_path / "out" / "video_report.json").read_text())
    assert [r["keyframe"] for r in report["per_frame"]] == [True, False, False]  # keyframe_interval 4
    assert report["per_frame"][1]["gflops"] < report["per_frame"][1]["gflops_full"]
    assert main(["predict", "--checkpoint", str(checkpoint), str(tmp_path / "nothing"), "--out",
                 str(tmp_path / "o2"), "--video"]) == 2


def test_single_image_result_cannot_seed_a_video(tmp_path: Path) -> None:
    frames = images(write_frames(tmp_path / "frames", 2))
    inference = SharedInference(tiny_model(), threshold=0.15, mode="token")
    single = inference.run(frames[0], for_video=False)
    torch.testing.assert_close(single.pred["depth"], inference.run(frames[0]).pred["depth"], rtol=0, atol=0)
    with pytest.raises(ValueError, match="for_video"):
        inference.run(frames[1], single, keyframe=False)


def test_cli_video_options_panels_and_animation(tmp_path: Path, capsys) -> None:
    from densemtl.cli import main

    write_frames(tmp_path / "frames", 3)
    checkpoint = save_tiny_checkpoint(tmp_path / "model.pt")
    out = tmp_path / "out"
    assert main(["predict", "--checkpoint", str(checkpoint), str(tmp_path / "frames"), "--out", str(out), "--video",
                 "--keyframe-interval", "2", "--threshold", "0", "--temporal-threshold", "0"]) == 0
    assert capsys.readouterr().out.strip().endswith(f"wrote {out}: predictions, panels/, video.gif, video_report.json")
    report = json.loads((out / "video_report.json").read_text())
    assert [r["keyframe"] for r in report["per_frame"]] == [True, False, True]
    assert (report["threshold"], report["temporal_threshold"], report["mode"]) == (0.0, 0.0, "reuse")
    model = tiny_model()
    dense = SharedInference(model, threshold=0.0)
    for index, image in enumerate(images(sorted((tmp_path / "frames").iterdir()))):
        saved = np.load(out / "depth" / f"frame{index:03d}.npy")
        np.testing.assert_allclose(saved, dense.dense(image).pred["depth"][0, 0].numpy(), rtol=1e-4, atol=1e-4)
    panel = np.array(Image.open(out / "panels" / "frame001.png"))
    assert panel.shape == (32, 48 * 4, 3)  # the frame, then semseg, depth, edge
    with Image.open(out / "video.gif") as animation:
        assert animation.n_frames == 3 and animation.size == (48 * 4, 32)
    for option, value, key in [("--keyframe-interval", "0", "sharing.keyframe_interval"),
                               ("--threshold", "nan", "sharing.threshold"),
                               ("--temporal-threshold", "-1", "sharing.temporal_threshold")]:
        assert main(["predict", "--checkpoint", str(checkpoint), str(tmp_path / "frames"), "--out",
                     str(tmp_path / "bad"), "--video", option, value]) == 2
        assert key in capsys.readouterr().err


def test_any_model_runs_a_video_frame_by_frame(tmp_path: Path, capsys) -> None:
    """A multitask checkpoint on `data synth --clips` output: each frame as predict would do it alone."""
    from densemtl.cli import main
    from densemtl.data.synthetic.dataset import load_split
    from densemtl.engine.predict import predict_images
    from tests.conftest import make_trainer, tiny_config

    config = tiny_config(tmp_path, "train.steps=1", "data.tasks=[semseg,depth]", "data.synthetic.num_clips=1",
                         "data.synthetic.clip_length=3")
    make_trainer(config).fit()
    checkpoint = Path(config.out_dir) / "checkpoints" / "last.pt"
    synthetic = [f"data.synthetic.{key}={value}" for key, value in to_dict(config.data.synthetic).items()]
    assert main(["data", "synth", "--out", str(tmp_path / "synth"), "--clips", *synthetic]) == 0
    clip = tmp_path / "synth" / "clips" / "clip000"
    frames = sorted(clip.iterdir())
    assert [path.name for path in frames] == ["0000.png", "0001.png", "0002.png"]
    assert np.array_equal(np.array(Image.open(frames[1])), load_split(config.data.synthetic, "clips")["image"][1])
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(checkpoint), str(clip), "--out", str(tmp_path / "video"),
                 "--video"]) == 0
    report = json.loads((tmp_path / "video" / "video_report.json").read_text())
    assert report["mode"] == "frame by frame" and report["frames"] == 3 and report["gflops_per_frame"] > 0
    predict_images(checkpoint, frames, tmp_path / "single", device="cpu")
    for path in frames:
        np.testing.assert_array_equal(np.load(tmp_path / "video" / "depth" / f"{path.stem}.npy"),
                                      np.load(tmp_path / "single" / "depth" / f"{path.stem}.npy"))
    with Image.open(tmp_path / "video" / "video.gif") as animation:
        assert animation.n_frames == 3
    assert main(["predict", "--checkpoint", str(checkpoint), str(clip), "--out", str(tmp_path / "v2"), "--video",
                 "--threshold", "0.1"]) == 2
    assert "--threshold set(s) the reuse of a computation-sharing model" in capsys.readouterr().err
