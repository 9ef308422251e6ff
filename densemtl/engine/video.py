"""``densemtl predict --video``: a checkpoint on a folder of consecutive frames, reusing computation across
tasks and through time; the checkpoint's architecture must be deployed as a :class:`VideoInference` (the
``sharing`` architecture's :class:`densemtl.models.sharing.inference.SharedInference`).

Every ``keyframe_interval``-th frame is a keyframe (the base task runs in full, sub-tasks reuse the base's
activations); the frames between reuse the previous frame's activations, in the checkpoint's
``sharing.inference`` mode (element: output-delta elements, counted FLOPs; token: whole tokens, measured
time). A model trained with the temporal term (``configs/synthetic_sharing_video.yaml``) changes less
between frames, so more is reused. Each frame is also run in full (every task densely) for the comparison;
the report ``out/video_report.json`` holds, per frame, the counted FLOPs and the measured time of both,
and the share recomputed per task (tokens, or output elements in element mode). Predictions are written
as ``out/<task>/<frame>.<ext>`` (:meth:`Task.save`).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from tqdm import tqdm

from densemtl.data.transforms import normalize_image
from densemtl.engine.checkpoint import load_model
from densemtl.engine.distributed import DistInfo, resolve_device, synchronize
from densemtl.engine.predict import read_image
from densemtl.errors import ConfigError, DataError, UserError
from densemtl.jsonio import write_json
from densemtl.registry import ARCHITECTURES

if TYPE_CHECKING:
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


def predict_video(
    checkpoint: Path,
    frames_dir: Path,
    out: Path,
    keyframe_interval: int | None = None,
    threshold: float | None = None,
    temporal_threshold: float | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    """Predict every frame of ``frames_dir`` with reuse; write predictions and the report; return the report.

    Unset options come from the checkpoint's ``sharing`` config section.
    """
    loaded = load_model(checkpoint, resolve_device(device or "auto", DistInfo()))
    sharing = loaded.config.sharing
    interval = sharing.keyframe_interval if keyframe_interval is None else keyframe_interval
    sharing = replace(
        sharing,
        threshold=sharing.threshold if threshold is None else threshold,
        temporal_threshold=sharing.temporal_threshold if temporal_threshold is None else temporal_threshold,
    )
    config = replace(loaded.config, sharing=sharing)
    inference = ARCHITECTURES.lookup(config.model.arch).deployed(loaded.model, config)
    if not isinstance(inference, VideoInference):
        raise UserError(
            f"{checkpoint}: predict --video needs an architecture deployed with reuse across frames; "
            f"model.arch '{config.model.arch}' is not"
        )
    paths = list_frames(frames_dir)
    out = Path(out)
    for name in loaded.tasks:
        (out / name).mkdir(parents=True, exist_ok=True)
    target = next(loaded.model.parameters()).device
    images = [normalize_image(read_image(path))[None].to(target) for path in paths]
    records = []
    frames = run_video(inference, images, interval)
    progress = tqdm(zip(paths, frames, strict=True), total=len(paths), desc="video", unit="frame")
    for index, (path, (result, seconds)) in enumerate(progress):
        start = time.perf_counter()
        full = inference.dense(images[index])
        synchronize(images[index].device)
        full_seconds = time.perf_counter() - start
        for name, task in loaded.tasks.items():
            task.save(task.predict(result.pred[name].float())[0].cpu(), out / name / path.stem)
        records.append(
            {
                "frame": path.name,
                "keyframe": index % interval == 0,
                "gflops": sum(result.flops.values()) / 1e9,
                "gflops_full": sum(full.flops.values()) / 1e9,
                "gflops_per_task": {t: f / 1e9 for t, f in result.flops.items()},
                "seconds": seconds,
                "seconds_full": full_seconds,
                "recomputed": result.recomputed,
            }
        )
    report = {
        "checkpoint": str(checkpoint),
        "frames": len(records),
        "keyframe_interval": interval,
        "inference": sharing.inference,
        "threshold": float(sharing.threshold),
        "temporal_threshold": float(sharing.temporal_threshold),
        "gflops_per_frame": statistics.mean(r["gflops"] for r in records),
        "gflops_per_frame_full": statistics.mean(r["gflops_full"] for r in records),
        "median_seconds": statistics.median(r["seconds"] for r in records),
        "median_seconds_full": statistics.median(r["seconds_full"] for r in records),
        "per_frame": records,
    }
    write_json(report, out / "video_report.json")
    print(
        f"video: {len(records)} frames, keyframe every {interval}: "
        f"{report['gflops_per_frame']:.3f} GFLOPs/frame vs {report['gflops_per_frame_full']:.3f} in full, "
        f"median {report['median_seconds'] * 1e3:.1f} ms vs {report['median_seconds_full'] * 1e3:.1f} ms; "
        f"report: {out / 'video_report.json'}"
    )
    return report
