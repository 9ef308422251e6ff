"""Joint transforms: one random scale / crop / flip applied identically to the image and every target.

Shared by all datasets, so the input format is dataset-agnostic. A raw sample (what a loader reads) is::

    {"image": uint8 H x W x 3 numpy (RGB),
     <task>: target as numpy or tensor in the conventions of densemtl.tasks
             (label maps H x W integers; depth 1 x H x W or H x W metres; normals 3 x H x W;
              edge / saliency 1 x H x W or H x W), or None when the sample has no label for the task,
     "meta": {"name": str, ...}}

:func:`to_tensor_sample` turns it into the contract format (``image`` float32 3 x H x W normalised with
``IMAGE_MEAN``/``IMAGE_STD``, targets as tensors, ``meta["size"]`` = the native ``(H, W)``; a None target
becomes the task's all-invalid target and the task is listed in ``meta["missing"]``). The
transform returned by :func:`build_transform` does that and then, for training, a random scale, a random
crop (padding with each task's fill value where the scaled image is smaller) and a horizontal flip.

The image is resampled bilinearly; each target is converted, resampled, flipped and padded as its task
says (:meth:`Task.to_target`, :meth:`Task.resize_target`, :meth:`Task.flip_target`, ``Task.fill_value``):
nearest neighbour keeps labels exact, depth averages valid depths only, a flip negates the normals' x.
Scaling the image is a zoom, so camera-frame normals and metric depth keep their values.

Once the trainer has called :meth:`JointTransform.set_epoch`, a sample's augmentation is a function of
``(seed, epoch, sample index)`` alone: the same whatever the number of data workers or processes, and
the same after a resume in the middle of an epoch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from densemtl.config import DataConfig
from densemtl.constants import IMAGE_MEAN, IMAGE_STD
from densemtl.errors import DataError
from densemtl.tasks import TASKS, Task

_MEAN = torch.tensor(IMAGE_MEAN, dtype=torch.float32).view(3, 1, 1)
_STD = torch.tensor(IMAGE_STD, dtype=torch.float32).view(3, 1, 1)
_IMAGE_FILL = 0.0  # a normalised image is padded with zeros, i.e. with the mean colour


def normalize_image(image: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 H x W x 3 (or float 3 x H x W in [0, 1]) -> float32 3 x H x W normalised."""
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise DataError(f"expected an RGB image of shape H x W x 3, got {image.shape}")
        tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 255.0
    else:
        tensor = image.float()
        if tensor.ndim != 3 or tensor.shape[0] != 3:
            raise DataError(f"expected an image tensor of shape 3 x H x W, got {tuple(tensor.shape)}")
    return (tensor - _MEAN) / _STD


def denormalize_image(image: torch.Tensor) -> np.ndarray:
    """Inverse of :func:`normalize_image`: float 3 x H x W -> uint8 H x W x 3 (for pictures)."""
    rgb = (image.detach().float().cpu() * _STD + _MEAN).clamp(0, 1)
    return (rgb.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)


def _task(key: str) -> type[Task]:
    """The task class of a sample key that is not ``image`` or ``meta``."""
    if key not in TASKS:
        raise DataError(f"sample key '{key}' is neither 'image', 'meta' nor a task ({', '.join(TASKS)})")
    return TASKS[key]


def to_tensor_targets(sample: Mapping[str, Any], size: tuple[int, int]) -> dict[str, Any]:
    """The targets and ``meta`` of a raw sample in the contract format, each checked to be ``size`` (H, W);
    an ``image`` entry is left out, a missing target (None) becomes its task's empty target."""
    out: dict[str, Any] = {}
    missing = [key for key, value in sample.items() if value is None]
    for key, value in sample.items():
        if key in ("image", "meta"):
            continue
        target = _task(key).to_target(value) if value is not None else _task(key).empty_target(size)
        if tuple(target.shape[-2:]) != size:
            raise DataError(f"target '{key}' has size {tuple(target.shape[-2:])}, the image {size}")
        out[key] = target
    meta = dict(sample.get("meta", {}))
    meta.setdefault("size", size)
    if missing:
        meta["missing"] = tuple(missing)
    out["meta"] = meta
    return out


def to_tensor_sample(sample: Mapping[str, Any]) -> dict[str, Any]:
    """A raw sample (see the module docstring) -> the contract format, without augmentation."""
    if "image" not in sample:
        raise DataError(f"sample {sample.get('meta', {}).get('name', '?')!r} has no 'image'")
    image = normalize_image(sample["image"])
    return {"image": image, **to_tensor_targets(sample, tuple(image.shape[-2:]))}


def _fill_values(tasks_fill: Mapping[str, float] | None) -> dict[str, float]:
    fills = {name: float(task.fill_value) for name, task in TASKS.items()}
    fills.update(tasks_fill or {})
    fills["image"] = _IMAGE_FILL
    return fills


def _resize(key: str, value: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resample one entry to ``size``: the image bilinearly, a target as its task says."""
    if tuple(value.shape[-2:]) == size:
        return value
    if key == "image":
        return F.interpolate(value[None], size=size, mode="bilinear", align_corners=False)[0]
    return _task(key).resize_target(value, size)


def _flip(key: str, value: torch.Tensor) -> torch.Tensor:
    """Mirror one entry left-right: the image as pixels, a target as its task says."""
    return value.flip(-1) if key == "image" else _task(key).flip_target(value)


def _pad(value: torch.Tensor, height: int, width: int, fill: float) -> torch.Tensor:
    """Pad at the bottom and right to at least ``height`` x ``width`` with ``fill``."""
    pad_h, pad_w = max(height - value.shape[-2], 0), max(width - value.shape[-1], 0)
    if pad_h == 0 and pad_w == 0:
        return value
    shape = (*value.shape[:-2], value.shape[-2] + pad_h, value.shape[-1] + pad_w)
    out = torch.full(shape, fill, dtype=value.dtype)
    out[..., : value.shape[-2], : value.shape[-1]] = value
    return out


def _entries(sample: Mapping[str, Any]) -> list[str]:
    return [key for key in sample if key != "meta"]


def pad_to(
    sample: Mapping[str, Any], size: tuple[int, int], tasks_fill: Mapping[str, float] | None = None
) -> dict[str, Any]:
    """Pad a tensor sample at the bottom/right to ``size`` (for batching images at native resolution).

    ``meta["size"]`` keeps the unpadded size, so predictions can be cropped back with ``[:h, :w]``.
    """
    height, width = size
    current = sample["image"].shape[-2:]
    if current[0] > height or current[1] > width:
        raise DataError(f"cannot pad an image of size {tuple(current)} to the smaller size {tuple(size)}")
    fills = _fill_values(tasks_fill)
    out = {key: _pad(sample[key], height, width, fills[key]) for key in _entries(sample)}
    out["meta"] = sample["meta"]
    return out


class JointTransform:
    """Random scale, crop and horizontal flip, the same for the image and every target.

    ``crop_size`` None crops back to the native size after scaling, so a batch keeps one size.
    Random numbers come from a generator seeded by ``(seed, epoch, index)`` after :meth:`set_epoch`,
    else from torch's global generator.
    """

    def __init__(
        self,
        crop_size: tuple[int, int] | None,
        scale_range: tuple[float, float] = (1.0, 1.0),
        flip: bool = True,
        tasks_fill: Mapping[str, float] | None = None,
        train: bool = True,
    ) -> None:
        self.crop_size = tuple(crop_size) if crop_size is not None else None
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        self.flip = flip
        self.fills = _fill_values(tasks_fill)
        self.train = train
        # (set, seed, epoch) in shared memory: persistent data workers see each new epoch too
        self._epoch_seed = torch.zeros(3, dtype=torch.int64).share_memory_()

    @property
    def epoch_seed(self) -> tuple[int, int] | None:
        set_, seed, epoch = self._epoch_seed.tolist()
        return (seed, epoch) if set_ else None

    def set_epoch(self, seed: int, epoch: int) -> None:
        """Draw each sample's augmentation from ``(seed, epoch, index)`` from now on."""
        self._epoch_seed.copy_(torch.tensor([1, seed, epoch]))

    def __call__(self, sample: Mapping[str, Any], index: int | None = None) -> dict[str, Any]:
        tensors = to_tensor_sample(sample)
        if not self.train:
            return tensors
        generator = None
        if self.epoch_seed is not None and index is not None:
            state = np.random.SeedSequence([*self.epoch_seed, index]).generate_state(1, dtype=np.uint64)
            generator = torch.Generator().manual_seed(int(state[0]))
        return self.augment(tensors, generator)

    def augment(self, sample: Mapping[str, Any], generator: torch.Generator | None = None) -> dict[str, Any]:
        """Scale, crop and flip a sample already in the contract format."""
        keys = _entries(sample)
        native = tuple(sample["image"].shape[-2:])
        crop_h, crop_w = self.crop_size or native
        lo, hi = self.scale_range
        scale = lo + (hi - lo) * torch.rand((), generator=generator).item()
        scaled = (max(1, round(native[0] * scale)), max(1, round(native[1] * scale)))
        out = {key: _pad(_resize(key, sample[key], scaled), crop_h, crop_w, self.fills[key]) for key in keys}
        height, width = out["image"].shape[-2:]
        top = int(torch.randint(height - crop_h + 1, (), generator=generator))
        left = int(torch.randint(width - crop_w + 1, (), generator=generator))
        out = {key: value[..., top : top + crop_h, left : left + crop_w] for key, value in out.items()}
        if self.flip and torch.rand((), generator=generator).item() < 0.5:
            out = {key: _flip(key, value) for key, value in out.items()}
        out = {key: value.contiguous() for key, value in out.items()}
        out["meta"] = dict(sample["meta"])
        return out


def build_transform(
    data_config: DataConfig, tasks_fill: Mapping[str, float] | None = None, train: bool = True
) -> JointTransform:
    """The transform for a dataset: augmentation from ``data_config`` when ``train``, else none.

    ``tasks_fill`` overrides the padding value of a task (default: ``Task.fill_value``).
    """
    return JointTransform(
        crop_size=tuple(data_config.crop_size) if data_config.crop_size else None,
        scale_range=tuple(data_config.scale_range),
        flip=data_config.flip,
        tasks_fill=tasks_fill,
        train=train,
    )
