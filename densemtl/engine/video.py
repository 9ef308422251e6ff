"""``densemtl predict --video``: a checkpoint on a folder of consecutive frames.

A model deployed as a :class:`VideoInference` (the ``sharing`` architecture's
:class:`densemtl.models.sharing.inference.SharedInference`) reuses computation across tasks and through time:
every ``keyframe_interval``-th frame is a keyframe (the base task runs in full, sub-tasks reuse the base's
activations); the frames between reuse the previous frame's activations, in the checkpoint's
``sharing.inference`` mode (element: output-delta elements, counted FLOPs; token: whole tokens, measured
time). A model trained with the temporal term (``configs/synthetic_sharing_video.yaml``) changes less
between frames, so more is reused. Each frame is also run in full (every task densely) for the comparison.
Any other model runs frame by frame.

Written under ``out``: ``<task>/<frame>.<ext>`` (:meth:`Task.save`), ``panels/<frame>.png`` (the frame and
each task's colours), ``video.gif`` (the panels animated) and ``video_report.json`` (per frame: the counted
GFLOPs and the measured time, with reuse also those of the full run and the share recomputed per task:
tokens, or output elements in element mode).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm import tqdm

from densemtl.data.transforms import normalize_image
from densemtl.engine.bench import deployed_cost
from densemtl.engine.checkpoint import LoadedModel, checkpoint_config, load_checkpoint, model_from_state
from densemtl.engine.distributed import DistInfo, resolve_device, synchronize
from densemtl.engine.predict import read_image, save_predictions
from densemtl.errors import ConfigError, DataError, UserError
from densemtl.jsonio import write_json
from densemtl.registry import ARCHITECTURES

if TYPE_CHECKING:
    from densemtl.config import Config
    from densemtl.models.sharing.inference import FrameResult

FRAME_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")


@runtime_checkable
class VideoInference(Protocol):
    """A deployed form that runs a frame reusing the previous frame's work, or every task in full."""

    def run(self, image: torch.Tensor, previous: FrameResult | None = None, keyframe: bool = True) -> FrameResult:
        ...

    def dense(self, image: torch.Tensor) -> FrameResult: ...


def list_frames(folder: Path) -> list[Path]:
    """The image files of ``folder`` in name order (frame order); a clear error when there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder of video frames")
    frames = sorted(p for p in folder.iterdir() if p.suffix.lower() in FRAME_EXTENSIONS)
    if not frames:
        raise DataError(f"{folder}: no frames ({', '.join(FRAME_EXTENSIONS)} files)")
    return frames


def run_video(
    inference: VideoInference, frames: Iterable[torch.Tensor], keyframe_interval: int
) -> Iterator[tuple[FrameResult, float]]:
    """``(result, seconds)`` per frame (each a 1 x 3 x H x W tensor); keyframes every ``keyframe_interval``."""
    if keyframe_interval < 1:
        raise ConfigError(f"key 'sharing.keyframe_interval': must be >= 1, got {keyframe_interval}")
    previous = None
    for index, frame in enumerate(frames):
        synchronize(frame.device)
        start = time.perf_counter()
        result = inference.run(frame, previous, keyframe=index % keyframe_interval == 0)
        synchronize(frame.device)
        yield result, time.perf_counter() - start
        previous = result


def _video_config(checkpoint: Path, options: dict[str, float | int | None], device: str | None) -> LoadedModel:
    """The checkpoint's model, its ``sharing`` section changed by the options given (checked like config keys)."""
    state = load_checkpoint(checkpoint)
    overrides = [f"sharing.{key}={value}" for key, value in options.items() if value is not None]
    config = checkpoint_config(state, None, overrides)
    return model_from_state(state, config, checkpoint, resolve_device(device or "auto", DistInfo()))


def _with_reuse(inference: VideoInference, images: list[torch.Tensor], interval: int
                ) -> Iterator[tuple[dict[str, torch.Tensor], dict[str, Any]]]:
    """Raw outputs and the report record of each frame, reusing computation (and each frame run in full)."""
    for index, (result, seconds) in enumerate(run_video(inference, images, interval)):
        start = time.perf_counter()
        full = inference.dense(images[index])
        synchronize(images[index].device)
        full_seconds = time.perf_counter() - start
        yield result.pred, {
            "keyframe": index % interval == 0,
            "gflops": sum(result.flops.values()) / 1e9,
            "gflops_full": sum(full.flops.values()) / 1e9,
            "gflops_per_task": {t: f / 1e9 for t, f in result.flops.items()},
            "seconds": seconds,
            "seconds_full": full_seconds,
            "recomputed": result.recomputed,
        }


def _frame_by_frame(model: nn.Module, images: list[torch.Tensor], tasks: list[str]
                    ) -> Iterator[tuple[dict[str, torch.Tensor], dict[str, Any]]]:
    """Raw outputs and the report record of each frame of a model without reuse (GFLOPs counted per size)."""
    counted: dict[tuple[int, ...], float] = {}
    for image in images:
        size = tuple(image.shape[-2:])
        if size not in counted:
            counted[size] = deployed_cost(model, tasks, size)["gflops"]
        synchronize(image.device)
        start = time.perf_counter()
        with torch.no_grad():
            raw = model(image)["pred"]
        synchronize(image.device)
        yield raw, {"gflops": counted[size], "seconds": time.perf_counter() - start}


def predict_video(
    checkpoint: Path,
    frames_dir: Path,
    out: Path,
    keyframe_interval: int | None = None,
    threshold: float | None = None,
    temporal_threshold: float | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    """Predict every frame of ``frames_dir``; write predictions, panels, the GIF and the report; return the report.

    The options (unset: the checkpoint's ``sharing`` section) apply to a model deployed with reuse; given for
    another model they are an error.
    """
    options = {"keyframe_interval": keyframe_interval, "threshold": threshold, "temporal_threshold": temporal_threshold}
    loaded = _video_config(checkpoint, options, device)
    config = loaded.config
    inference = ARCHITECTURES.lookup(config.model.arch).deployed(loaded.model, config)
    reuse = isinstance(inference, VideoInference)
    given = [f"--{key.replace('_', '-')}" for key, value in options.items() if value is not None]
    if given and not reuse:
        raise UserError(f"{checkpoint}: {', '.join(given)} set(s) the reuse of a computation-sharing model; "
                        f"model.arch '{config.model.arch}' runs frame by frame")
    paths = list_frames(frames_dir)
    out = Path(out)
    for name in [*loaded.tasks, "panels"]:
        (out / name).mkdir(parents=True, exist_ok=True)
    target = next(loaded.model.parameters()).device
    pictures = [read_image(path) for path in paths]
    images = [normalize_image(rgb)[None].to(target) for rgb in pictures]
    interval = config.sharing.keyframe_interval
    tasks = list(loaded.tasks)
    frames = _with_reuse(inference, images, interval) if reuse else _frame_by_frame(inference, images, tasks)
    records, panels = [], []
    for path, rgb, (raw, record) in tqdm(zip(paths, pictures, frames, strict=True), total=len(paths), desc="video",
                                         unit="frame"):
        panels.append(save_predictions(rgb, loaded.tasks, raw, out, path.stem)[1])
        records.append({"frame": path.name, **record})
    report = _report(checkpoint, config, records, reuse)
    animation = save_animation(panels, out / "video.gif")
    write_json(report, out / "video_report.json")
    print(_summary(report) + f"; wrote {out}: predictions, panels/, {animation.name}, video_report.json")
    return report


def _report(checkpoint: Path, config: Config, records: list[dict[str, Any]], reuse: bool) -> dict[str, Any]:
    report: dict[str, Any] = {
        "checkpoint": str(checkpoint),
        "mode": "reuse" if reuse else "frame by frame",
        "frames": len(records),
        "gflops_per_frame": statistics.mean(r["gflops"] for r in records),
        "median_seconds": statistics.median(r["seconds"] for r in records),
    }
    if reuse:
        report.update({
            "keyframe_interval": config.sharing.keyframe_interval,
            "inference": config.sharing.inference,
            "threshold": float(config.sharing.threshold),
            "temporal_threshold": float(config.sharing.temporal_threshold),
            "gflops_per_frame_full": statistics.mean(r["gflops_full"] for r in records),
            "median_seconds_full": statistics.median(r["seconds_full"] for r in records),
        })
    return {**report, "per_frame": records}


def _summary(report: dict[str, Any]) -> str:
    line = f"video: {report['frames']} frames, {report['mode']}"
    if report["mode"] == "reuse":
        return (f"{line}, keyframe every {report['keyframe_interval']}: {report['gflops_per_frame']:.3f} GFLOPs/frame "
                f"vs {report['gflops_per_frame_full']:.3f} in full, median {report['median_seconds'] * 1e3:.1f} ms "
                f"vs {report['median_seconds_full'] * 1e3:.1f} ms")
    return f"{line}: {report['gflops_per_frame']:.3f} GFLOPs/frame, median {report['median_seconds'] * 1e3:.1f} ms"


def save_animation(panels: list[np.ndarray], path: Path, fps: float = 8.0) -> Path:
    """The panels as an animated GIF (Pillow), looping, ``fps`` frames per second."""
    frames = [Image.fromarray(panel) for panel in panels]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=round(1000 / fps), loop=0)
    return path
