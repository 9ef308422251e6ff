"""Synthetic frames by split, their on-disk cache, and the datasets that serve them.

Frames are deterministic functions of ``(seed, split, index)``; clip frames of ``(seed, clip index)``.
A split is rendered once and cached as compressed ``.npz`` under the cache directory, keyed by every
generation parameter and :data:`GENERATOR_VERSION` (raise it whenever a change alters any rendered
array, so stale caches are never read).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from densemtl.config import DataConfig, SyntheticConfig
from densemtl.data.base import DenseDataset
from densemtl.data.synthetic.render import render
from densemtl.data.synthetic.scene import CLASS_NAMES, MOTIONS, sample_clip, sample_scene
from densemtl.data.transforms import build_transform, to_tensor_sample
from densemtl.dataset_info import DatasetInfo
from densemtl.errors import DataError

GENERATOR_VERSION = 3
SYNTHETIC_TASKS = ("semseg", "depth", "normals", "edge", "saliency")
SPLITS = ("train", "val", "test")
MOTION_KINDS = tuple(MOTIONS)


def _split_stream(split: str) -> int:
    streams = {"train": 0, "val": 1, "test": 2, "clips": 3}
    if split not in streams:
        raise DataError(f"synthetic dataset: unknown split '{split}' (known: {', '.join(streams)})")
    return streams[split]


def motion_of(config: SyntheticConfig, index: int) -> str:
    """The kind of motion of clip (or training frame) ``index``: ``mixed`` takes the kinds in turn."""
    return MOTION_KINDS[index % len(MOTION_KINDS)] if config.motion == "mixed" else config.motion


def render_frame(config: SyntheticConfig, split: str, index: int) -> dict[str, Any]:
    """Frame ``index`` of ``split``: a fresh scene and camera drawn from ``(seed, split, index)``.

    Training frames with ``neighbour_offsets`` are frames of a short clip of their scene (motion
    :func:`motion_of`); ``neighbours`` then holds the images at those offsets (K x H x W x 3).
    """
    rng = np.random.default_rng([config.seed, _split_stream(split), index])
    offsets = config.neighbour_offsets if split == "train" else []
    if not offsets:
        scene, cameras = sample_scene(rng, 1)
        return render(scene, cameras[0], config.height, config.width, rng)
    first = min(0, *offsets)
    _, cameras, scenes = sample_clip(rng, max(0, *offsets) - first + 1, motion_of(config, index))
    frame = render(scenes[-first], cameras[-first], config.height, config.width, rng)
    frame["neighbours"] = np.stack([render(scenes[k - first], cameras[k - first], config.height, config.width,
                                           rng)["image"] for k in offsets])
    return frame


def render_clip(config: SyntheticConfig, clip_index: int) -> list[dict[str, Any]]:
    """Clip ``clip_index``: ``config.clip_length`` consecutive frames of one scene, moving as
    :func:`motion_of` says (the default: the camera moves smoothly)."""
    rng = np.random.default_rng([config.seed, _split_stream("clips"), clip_index])
    _, cameras, scenes = sample_clip(rng, config.clip_length, motion_of(config, clip_index))
    return [render(scene, camera, config.height, config.width, rng) for scene, camera in zip(scenes, cameras,
                                                                                             strict=True)]


def split_size(config: SyntheticConfig, split: str) -> int:
    """Number of frames of a split (clips: clips x frames per clip)."""
    sizes = {"train": config.num_train, "val": config.num_val, "test": config.num_test,
             "clips": config.num_clips * config.clip_length}
    _split_stream(split)
    return sizes[split]


def cache_dir(config: SyntheticConfig) -> Path:
    """``config.cache_dir``, else ``$DENSEMTL_CACHE``, else ``~/.cache/densemtl``."""
    root = config.cache_dir or os.environ.get("DENSEMTL_CACHE") or Path.home() / ".cache" / "densemtl"
    return Path(root).expanduser()


def cache_path(config: SyntheticConfig, split: str) -> Path:
    """The cache file of a split, named by a hash of every parameter that changes its content."""
    params = {"version": GENERATOR_VERSION, "split": split, "height": config.height, "width": config.width,
              "seed": config.seed, "frames": split_size(config, split)}
    if split == "clips":
        params.update(num_clips=config.num_clips, clip_length=config.clip_length)
    if split == "train" and config.neighbour_offsets:
        params.update(neighbour_offsets=list(config.neighbour_offsets))
    if config.motion != "camera" and (split == "clips" or "neighbour_offsets" in params):
        params.update(motion=config.motion)  # absent for the original kind, so its caches keep their names
    key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir(config) / f"synthetic-{split}-{config.height}x{config.width}-{key}.npz"


def _generate(config: SyntheticConfig, split: str) -> dict[str, np.ndarray]:
    if split == "clips":
        frames = []
        for clip in tqdm(range(config.num_clips), desc="synthetic clips", unit="clip"):
            frames.extend(render_clip(config, clip))
    else:
        frames = [render_frame(config, split, index)
                  for index in tqdm(range(split_size(config, split)), desc=f"synthetic {split}", unit="frame")]
    keys = ("image", *SYNTHETIC_TASKS, *(("neighbours",) if "neighbours" in frames[0] else ()))
    return {key: np.stack([frame[key] for frame in frames]) for key in keys}


def load_split(config: SyntheticConfig, split: str) -> dict[str, np.ndarray]:
    """All frames of ``split`` as stacked arrays, rendered on first use and cached as compressed npz."""
    if split_size(config, split) <= 0:
        raise DataError(f"synthetic split '{split}' is empty: check data.synthetic (num_train / num_val / "
                        f"num_test, or num_clips and clip_length)")
    path = cache_path(config, split)
    if path.is_file():
        try:
            with np.load(path) as data:
                return {key: data[key] for key in data.files}
        except (OSError, ValueError, EOFError) as err:
            raise DataError(f"{path}: corrupt synthetic cache ({err}); delete it to regenerate") from None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz.tmp")
    except OSError as err:
        raise DataError(f"synthetic cache dir {path.parent} is not writable ({err.strerror}); set "
                        f"data.synthetic.cache_dir or $DENSEMTL_CACHE") from None
    try:
        with os.fdopen(handle, "wb") as file:
            arrays = _generate(config, split)
            np.savez_compressed(file, **arrays)
        os.replace(tmp, path)
    except OSError as err:
        raise DataError(f"{path}: cannot write the synthetic cache ({err.strerror})") from None
    finally:
        Path(tmp).unlink(missing_ok=True)
    return arrays




def synthetic_info() -> DatasetInfo:
    """The synthetic scenes' facts; ``tasks`` lists every task they label, whatever a run trains."""
    return DatasetInfo(name="synthetic", tasks=SYNTHETIC_TASKS, num_classes={"semseg": len(CLASS_NAMES)},
                       class_names={"semseg": list(CLASS_NAMES)}, boundary_max_dist=0.011)


def dropped_labels(config: SyntheticConfig, split: str, count: int) -> dict[str, frozenset[int]]:
    """The frames of ``split`` whose label of a task is dropped (``drop_labels``, training split only): the
    first ``round(fraction * count)`` of a permutation drawn from ``(seed, task)``, so exactly that share,
    the same frames in every epoch and every run."""
    if split != "train":
        return {}
    dropped = {}
    for task, fraction in config.drop_labels.items():
        rng = np.random.default_rng([config.seed, 1000 + SYNTHETIC_TASKS.index(task)])
        dropped[task] = frozenset(rng.permutation(count)[: round(fraction * count)].tolist())
    return dropped


def _frame_targets(
    arrays: dict[str, np.ndarray], index: int, tasks: Iterable[str], dropped: dict[str, frozenset[int]] | None = None
) -> dict[str, Any]:
    """One cached frame as a raw sample (the transforms' input format) with the requested tasks; a task
    whose label is dropped for this frame is None.

    The arrays are copied, so a sample never shares memory with the cache.
    """
    sample: dict[str, Any] = {"image": arrays["image"][index]}
    for task in tasks:
        sample[task] = None if index in (dropped or {}).get(task, ()) else np.array(arrays[task][index])
    return sample


class SyntheticDataset(DenseDataset):
    """Frames of one split in the sample contract format; ``train`` turns on the data config's augmentation."""

    dataset_name = "synthetic"
    title = "synthetic scenes"
    supported_tasks = SYNTHETIC_TASKS
    needs_root = False

    def __init__(self, data_config: DataConfig, split: str, train: bool) -> None:
        if split not in SPLITS:
            raise DataError(f"synthetic dataset: unknown split '{split}' (known: {', '.join(SPLITS)})")
        self.info = synthetic_info()
        self.split = split
        self.tasks = self.check_tasks(data_config.tasks)
        self.arrays = load_split(data_config.synthetic, split)
        self.data_offsets = list(data_config.synthetic.neighbour_offsets)
        self.dropped = dropped_labels(data_config.synthetic, split, len(self.arrays["image"]))
        self.transform = build_transform(data_config, train=train)

    @classmethod
    def dataset_info(cls, tasks: Iterable[str]) -> DatasetInfo:
        return synthetic_info()

    @classmethod
    def native_size(cls, data_config: DataConfig) -> tuple[int, int]:
        return (data_config.synthetic.height, data_config.synthetic.width)

    def __len__(self) -> int:
        return len(self.arrays["image"])

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = _frame_targets(self.arrays, index, self.tasks, self.dropped)
        sample["meta"] = {"name": f"{self.split}_{index:05d}"}
        if "neighbours" not in self.arrays:
            return self.transform(sample, index)
        return self._with_neighbour(sample, index)

    def _with_neighbour(self, sample: dict[str, Any], index: int) -> dict[str, Any]:
        """The sample plus ``neighbour``: the image at one of the neighbour offsets (drawn per sample and
        epoch like the augmentation), augmented exactly as the frame itself (one seed for both)."""
        epoch_seed = self.transform.epoch_seed
        if epoch_seed is None:
            seed = int(torch.randint(2**62, ()))
        else:
            seed = int(np.random.SeedSequence([*epoch_seed, index, 1]).generate_state(1, dtype=np.uint64)[0] >> 2)
        neighbours = self.arrays["neighbours"][index]
        choice = int(torch.randint(len(neighbours), (), generator=torch.Generator().manual_seed(seed)))
        frame = to_tensor_sample(sample)
        neighbour = to_tensor_sample({"image": neighbours[choice], "meta": {}})
        if self.transform.train:
            frame = self.transform.augment(frame, torch.Generator().manual_seed(seed + 1))
            neighbour = self.transform.augment(neighbour, torch.Generator().manual_seed(seed + 1))
        frame["neighbour"] = neighbour["image"]
        frame["meta"]["neighbour_offset"] = int(self.data_offsets[choice])
        return frame


class SyntheticClips(Dataset):
    """Video clips: item ``i`` is the list of ``clip_length`` consecutive samples of clip ``i`` (no
    augmentation; ``meta`` also holds ``clip`` and ``frame``)."""

    def __init__(self, data_config: DataConfig) -> None:
        self.info = synthetic_info()
        self.tasks = SyntheticDataset.check_tasks(data_config.tasks)
        self.config = data_config.synthetic
        self.arrays = load_split(data_config.synthetic, "clips")
        self.transform = build_transform(data_config, train=False)

    def __len__(self) -> int:
        return self.config.num_clips

    def __getitem__(self, clip: int) -> list[dict[str, Any]]:
        if not 0 <= clip < len(self):
            raise IndexError(clip)
        frames = []
        for frame in range(self.config.clip_length):
            sample = _frame_targets(self.arrays, clip * self.config.clip_length + frame, self.tasks)
            sample["meta"] = {"name": f"clip{clip:03d}_{frame:04d}", "clip": clip, "frame": frame}
            frames.append(self.transform(sample))
        return frames
