"""Every task in one place: output channels, loss, prediction, metric, on-disk encoding, colours.

Adding a task means adding one :class:`Task` subclass and its row in :data:`densemtl.registry.TASKS`.

Target conventions (per sample; a batch adds a leading dimension):

=============  ===============  ==========================================================
task           target           invalid / padding
=============  ===============  ==========================================================
semseg         int64  H x W      255
human_parts    int64  H x W      255 (images without part annotations are all 255)
depth          float 1 x H x W   0 (metres; 0 = no measurement)
normals        float 3 x H x W   the zero vector (camera frame, unit length where valid)
edge           float 1 x H x W   255 (1 = boundary pixel, 0 = none)
saliency       float 1 x H x W   255 (1 = salient, 0 = not)
=============  ===============  ==========================================================
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from densemtl.arrays import as_numpy, as_tensor
from densemtl.constants import IGNORE_INDEX
from densemtl.errors import DataError
from densemtl.label_relations import ClassRelation, DepthRelation, LabelRelation, NormalsRelation
from densemtl.registry import TASKS

if TYPE_CHECKING:
    from densemtl.config import ContrastiveConfig, EvalConfig
    from densemtl.dataset_info import DatasetInfo
    from densemtl.metrics.base import Metric



def class_palette(num_classes: int) -> np.ndarray:
    """A fixed, well-separated colour per class id (bit-interleaved, as the VOC palette is built)."""
    palette = np.zeros((256, 3), dtype=np.uint8)
    for index in range(256):
        value, red, green, blue = index, 0, 0, 0
        for bit in range(8):
            red |= ((value >> 0) & 1) << (7 - bit)
            green |= ((value >> 1) & 1) << (7 - bit)
            blue |= ((value >> 2) & 1) << (7 - bit)
            value >>= 3
        palette[index] = (red, green, blue)
    palette[IGNORE_INDEX] = (255, 255, 255)
    return palette


_PALETTE = class_palette(256)
# Anchor colours of a perceptually ordered dark-blue -> yellow ramp for scalar maps.
_RAMP = np.array(
    [[48, 18, 59], [70, 107, 227], [40, 188, 235], [50, 241, 151], [164, 252, 60], [237, 208, 58],
     [251, 128, 34], [210, 49, 5], [122, 4, 3]],
    dtype=np.float32,
)


def colour_ramp(values: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """Map a 2-D array to RGB with a blue-to-red ramp scaled to its valid range; invalid = black."""
    values = np.asarray(values, dtype=np.float32)
    valid = np.isfinite(values) if valid is None else valid & np.isfinite(values)
    out = np.zeros(values.shape + (3,), dtype=np.uint8)
    if not valid.any():
        return out
    lo, hi = np.percentile(values[valid], [1, 99])
    scaled = np.clip((values - lo) / max(hi - lo, 1e-6), 0, 1) * (len(_RAMP) - 1)
    index = np.clip(scaled.astype(np.int64), 0, len(_RAMP) - 2)
    frac = (scaled - index)[..., None]
    rgb = _RAMP[index] * (1 - frac) + _RAMP[index + 1] * frac
    out[valid] = rgb[valid].astype(np.uint8)
    return out


def _plane(value: torch.Tensor | np.ndarray) -> np.ndarray:
    """One H x W map from a tensor or array shaped H x W, 1 x H x W or 1 x 1 x H x W."""
    array = as_numpy(value, torch.float32)
    return array.reshape(array.shape[-2:])


def _normals_array(value: torch.Tensor | np.ndarray) -> np.ndarray:
    array = as_numpy(value, torch.float32)
    return array.reshape(3, *array.shape[-2:])


def _read_png(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as image:
            return np.array(image)
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: cannot read image ({err})") from None


@dataclass(frozen=True)
class Task:
    """One dense prediction task. Subclasses fill the class attributes and override the methods."""

    name: ClassVar[str]
    default_weight: ClassVar[float] = 1.0
    primary_metric: ClassVar[str]
    lower_is_better: ClassVar[bool] = False
    fill_value: ClassVar[float] = IGNORE_INDEX
    target_channels: ClassVar[int] = 1  # of a float target C x H x W (a label map is H x W)
    costly_metric: ClassVar[bool] = False  # seconds per image: validation may skip it (eval.boundary_during_training)
    prediction: ClassVar[str] = "raw output"  # what ``predict`` gives per pixel, in its units (exported models say it)
    file_format: ClassVar[str] = ""  # what ``save`` writes
    num_classes: int = 1

    @property
    def channels(self) -> int:
        """Output channels of the task's head."""
        return self.num_classes

    def loss(self, raw: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def predict(self, raw: torch.Tensor) -> torch.Tensor:
        """Turn raw head outputs into the prediction the metrics and the writers take."""
        return raw

    def build_metric(self, info: DatasetInfo, eval_config: EvalConfig) -> Metric:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """What a program using an exported model needs to read this task's outputs (its ``tasks.json`` entry)."""
        return {"name": self.name, "channels": self.channels, "prediction": self.prediction, "file": self.file_format}

    @classmethod
    def delta_m_metric(cls, eval_config: EvalConfig | None) -> str:
        """The metric delta_m compares for this task (the primary one unless ``eval_config`` chooses)."""
        return cls.primary_metric

    def label_relation(self, thresholds: ContrastiveConfig) -> LabelRelation | None:
        """How this task's labels make pixel pairs positive or negative for the contrastive regularizer
        (``thresholds``: its similarity thresholds); None when the labels give no such rule."""
        return None

    def colorize(self, value: torch.Tensor | np.ndarray) -> np.ndarray:
        """An RGB uint8 H x W x 3 picture of one prediction or target."""
        raise NotImplementedError

    def save(self, prediction: torch.Tensor | np.ndarray, stem: Path) -> Path:
        """Write one prediction in the field's on-disk encoding; returns the file written."""
        raise NotImplementedError

    def load(self, path: Path) -> torch.Tensor:
        """Read a file written by :meth:`save` (or by other codebases) back as a prediction."""
        raise NotImplementedError

    def find_file(self, folder: Path, name: str) -> Path:
        """The saved prediction for image ``name`` in ``folder`` (any supported extension)."""
        for ext in self.extensions:
            candidate = folder / f"{name}{ext}"
            if candidate.is_file():
                return candidate
        raise DataError(f"{folder}: no {self.name} prediction for '{name}' ({' or '.join(self.extensions)})")

    extensions: ClassVar[tuple[str, ...]] = (".png",)

    # Hooks of the data layer (transforms, ``data check``): class methods, as data code holds task classes.

    @classmethod
    def to_target(cls, value: torch.Tensor | np.ndarray) -> torch.Tensor:
        """A loader's raw target as this task's target: float32 C x H x W (H x W accepted when C is 1)."""
        tensor = as_tensor(value).float()
        if tensor.ndim == 2 and cls.target_channels == 1:
            tensor = tensor[None]
        if tensor.ndim != 3 or tensor.shape[0] != cls.target_channels:
            raise DataError(
                f"target '{cls.name}': expected {cls.target_channels} x H x W, got shape {tuple(tensor.shape)}"
            )
        return tensor

    @classmethod
    def empty_target(cls, size: tuple[int, int]) -> torch.Tensor:
        """The target of a sample without this task's label: every pixel invalid (``fill_value``)."""
        return torch.full((cls.target_channels, *size), float(cls.fill_value))

    @classmethod
    def resize_target(cls, target: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """``target`` resampled to ``size`` by nearest neighbour, which keeps every value exact."""
        batched = target[None, None] if target.ndim == 2 else target[None]
        resized = F.interpolate(batched.float(), size=size, mode="nearest-exact")
        resized = resized[0, 0] if target.ndim == 2 else resized[0]
        return resized.to(target.dtype)

    @classmethod
    def flip_target(cls, target: torch.Tensor) -> torch.Tensor:
        """``target`` of an image mirrored left-right."""
        return target.flip(-1)

    @classmethod
    def target_problems(cls, target: np.ndarray, path: Path) -> list[str]:
        """Implausible values of a target read from ``path``, one message each (``densemtl data check``)."""
        return []


def _valid_mean(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over ``valid`` pixels; zero (with gradient) when none is valid."""
    valid = valid.to(values.dtype)
    return (values * valid).sum() / valid.sum().clamp_min(1.0)


@dataclass(frozen=True)
class ClassMapTask(Task):
    """Per-pixel classification (cross-entropy, ignore 255)."""

    primary_metric: ClassVar[str] = "mIoU"
    prediction: ClassVar[str] = "class id (int64)"
    file_format: ClassVar[str] = "8-bit PNG of class ids"
    class_names: tuple[str, ...] | None = None

    def describe(self) -> dict[str, Any]:
        """Adds the class names (None when the dataset has none) and each class id's colour in :meth:`colorize`."""
        names = list(self.class_names) if self.class_names else None
        return {**super().describe(), "class_names": names, "colours": _PALETTE[: self.num_classes].tolist()}

    def loss(self, raw: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if not (target != IGNORE_INDEX).any():
            return raw.sum() * 0.0
        return F.cross_entropy(raw.float(), target.long(), ignore_index=IGNORE_INDEX)

    def predict(self, raw: torch.Tensor) -> torch.Tensor:
        return raw.argmax(dim=1)

    @classmethod
    def to_target(cls, value: torch.Tensor | np.ndarray) -> torch.Tensor:
        """An int64 H x W label map (1 x H x W accepted)."""
        tensor = as_tensor(value)
        tensor = tensor.squeeze(0) if tensor.ndim == 3 and tensor.shape[0] == 1 else tensor
        if tensor.ndim != 2:
            raise DataError(f"target '{cls.name}': expected an H x W label map, got shape {tuple(tensor.shape)}")
        return tensor.long()

    @classmethod
    def empty_target(cls, size: tuple[int, int]) -> torch.Tensor:
        return torch.full(size, IGNORE_INDEX, dtype=torch.long)

    def build_metric(self, info: DatasetInfo, eval_config: EvalConfig) -> Metric:
        from densemtl.metrics.semseg import ConfusionMetric

        return ConfusionMetric(self.num_classes, class_names=self.class_names)

    def label_relation(self, thresholds: ContrastiveConfig) -> LabelRelation:
        return ClassRelation(binary=False)

    def colorize(self, value: torch.Tensor | np.ndarray) -> np.ndarray:
        labels = _plane(value).astype(np.int64)
        return _PALETTE[np.clip(labels, 0, 255)]

    def save(self, prediction: torch.Tensor | np.ndarray, stem: Path) -> Path:
        path = stem.with_suffix(".png")
        labels = _plane(prediction)
        Image.fromarray(labels.astype(np.uint8)).save(path)
        return path

    def load(self, path: Path) -> torch.Tensor:
        array = _read_png(path)
        if array.ndim != 2:
            raise DataError(f"{path}: expected a single-channel PNG of class ids, got shape {array.shape}")
        return torch.from_numpy(array.astype(np.int64))


@dataclass(frozen=True)
class SemsegTask(ClassMapTask):
    name: ClassVar[str] = "semseg"
    default_weight: ClassVar[float] = 1.0


@dataclass(frozen=True)
class HumanPartsTask(ClassMapTask):
    name: ClassVar[str] = "human_parts"
    default_weight: ClassVar[float] = 2.0


@dataclass(frozen=True)
class DepthTask(Task):
    """Metric depth, L1 on valid pixels (gt > 0)."""

    name: ClassVar[str] = "depth"
    default_weight: ClassVar[float] = 1.0
    primary_metric: ClassVar[str] = "rmse"
    lower_is_better: ClassVar[bool] = True
    fill_value: ClassVar[float] = 0.0
    prediction: ClassVar[str] = "depth in metres (float32)"
    file_format: ClassVar[str] = ".npy float32 array of metres"
    extensions: ClassVar[tuple[str, ...]] = (".npy", ".png")
    max_plausible: ClassVar[float] = 100.0  # metres; more suggests millimetres stored as metres

    def loss(self, raw: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return _valid_mean((raw.float() - target).abs(), target > 0)

    @classmethod
    def resize_target(cls, target: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Bilinear over valid depths only (0 = no measurement stays 0 where most of the area is invalid)."""
        valid = (target > 0).float()
        weight = F.interpolate(valid[None], size=size, mode="bilinear", align_corners=False)[0]
        total = F.interpolate((target * valid)[None], size=size, mode="bilinear", align_corners=False)[0]
        return torch.where(weight > 0.5, total / weight.clamp_min(1e-6), torch.zeros_like(total))

    @classmethod
    def target_problems(cls, target: np.ndarray, path: Path) -> list[str]:
        if not (target > 0).any():
            return [f"{path}: no valid depth pixel"]
        if target.max() > cls.max_plausible:
            return [f"{path}: depth up to {target.max():.1f} m, expected metres (millimetres stored?)"]
        return []

    def build_metric(self, info: DatasetInfo, eval_config: EvalConfig) -> Metric:
        from densemtl.metrics.depth import DepthMetric

        return DepthMetric()

    def label_relation(self, thresholds: ContrastiveConfig) -> LabelRelation:
        return DepthRelation(thresholds.depth_positive, thresholds.depth_negative)

    def colorize(self, value: torch.Tensor | np.ndarray) -> np.ndarray:
        depth = _plane(value)
        return colour_ramp(depth, depth > 0)

    def save(self, prediction: torch.Tensor | np.ndarray, stem: Path) -> Path:
        path = stem.with_suffix(".npy")
        np.save(path, _plane(prediction).astype(np.float32))
        return path

    def load(self, path: Path) -> torch.Tensor:
        """``.npy`` in metres, or a 16-bit PNG in millimetres."""
        if path.suffix == ".npy":
            try:
                array = np.load(path).astype(np.float32)
            except (OSError, ValueError, EOFError) as err:
                raise DataError(f"{path}: cannot read depth array ({err})") from None
        else:
            raw = _read_png(path)
            if raw.dtype != np.uint16:
                raise DataError(f"{path}: a depth PNG must be 16-bit (millimetres), got {raw.dtype}")
            array = raw.astype(np.float32) / 1000.0
        array = np.squeeze(array)
        if array.ndim != 2:
            raise DataError(f"{path}: expected a 2-D depth map, got shape {array.shape}")
        return torch.from_numpy(array)[None]


@dataclass(frozen=True)
class NormalsTask(Task):
    """Surface normals in the camera frame; prediction L2-normalised before the loss and metric."""

    name: ClassVar[str] = "normals"
    default_weight: ClassVar[float] = 10.0
    primary_metric: ClassVar[str] = "mean"
    lower_is_better: ClassVar[bool] = True
    fill_value: ClassVar[float] = 0.0
    prediction: ClassVar[str] = "unit surface normal (float32 x, y, z) in the camera frame of the training data"
    file_format: ClassVar[str] = "RGB PNG, each component as (n + 1) / 2 * 255"
    extensions: ClassVar[tuple[str, ...]] = (".png", ".npy")
    target_channels: ClassVar[int] = 3
    unit_tolerance: ClassVar[float] = 0.1  # allowed | |n| - 1 | (8-bit PNG quantisation stays under 0.01)
    off_unit_fraction: ClassVar[float] = 0.01  # share of valid pixels allowed off unit length
    num_classes: int = 3
    cosine_loss: bool = False

    def loss(self, raw: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        pred = F.normalize(raw.float(), dim=1)
        valid = target.abs().sum(dim=1, keepdim=True) > 0
        if self.cosine_loss:
            return _valid_mean(1 - (pred * target).sum(dim=1, keepdim=True), valid)
        return _valid_mean((pred - target).abs().sum(dim=1, keepdim=True), valid)

    def predict(self, raw: torch.Tensor) -> torch.Tensor:
        return F.normalize(raw.float(), dim=1)

    @classmethod
    def flip_target(cls, target: torch.Tensor) -> torch.Tensor:
        """Mirrored, with x negated: the camera frame's x points to the right of the image."""
        return target.flip(-1) * torch.tensor([-1.0, 1.0, 1.0]).view(3, 1, 1)

    @classmethod
    def target_problems(cls, target: np.ndarray, path: Path) -> list[str]:
        norm = np.linalg.norm(target, axis=0)
        valid = norm > 0
        off = np.abs(norm[valid] - 1) > cls.unit_tolerance
        if valid.any() and off.mean() > cls.off_unit_fraction:
            return [f"{path}: {100 * off.mean():.1f}% of valid normals are not unit length "
                    f"(median |n| = {np.median(norm[valid]):.3f})"]
        return []

    def build_metric(self, info: DatasetInfo, eval_config: EvalConfig) -> Metric:
        from densemtl.metrics.normals import NormalsMetric

        return NormalsMetric()

    def label_relation(self, thresholds: ContrastiveConfig) -> LabelRelation:
        return NormalsRelation(thresholds.normals_positive_deg, thresholds.normals_negative_deg)

    def colorize(self, value: torch.Tensor | np.ndarray) -> np.ndarray:
        return encode_normals(_normals_array(value))

    def save(self, prediction: torch.Tensor | np.ndarray, stem: Path) -> Path:
        path = stem.with_suffix(".png")
        Image.fromarray(encode_normals(_normals_array(prediction))).save(path)
        return path

    def load(self, path: Path) -> torch.Tensor:
        """PNG in the ``2v/255 - 1`` encoding (zero pixels = invalid), or a float ``.npy`` (H x W x 3)."""
        if path.suffix == ".npy":
            try:
                array = np.load(path).astype(np.float32)
            except (OSError, ValueError, EOFError) as err:
                raise DataError(f"{path}: cannot read normals array ({err})") from None
            if array.ndim != 3 or 3 not in (array.shape[0], array.shape[-1]):
                raise DataError(f"{path}: expected an H x W x 3 normals array, got shape {array.shape}")
            return torch.from_numpy(array if array.shape[0] == 3 else array.transpose(2, 0, 1).copy())
        raw = _read_png(path)
        if raw.ndim != 3 or raw.shape[2] < 3:
            raise DataError(f"{path}: expected an RGB normals PNG, got shape {raw.shape}")
        return torch.from_numpy(decode_normals(raw[..., :3]))


def encode_normals(normals: np.ndarray) -> np.ndarray:
    """3 x H x W unit normals -> H x W x 3 uint8 with ``(v + 1) / 2 * 255``; zero vectors stay 0."""
    valid = np.abs(normals).sum(axis=0) > 0
    rgb = np.clip(np.rint((normals.transpose(1, 2, 0) + 1) * 127.5), 0, 255).astype(np.uint8)
    rgb[~valid] = 0
    return rgb


def decode_normals(rgb: np.ndarray) -> np.ndarray:
    """H x W x 3 uint8 -> 3 x H x W with ``2 v / 255 - 1``; all-zero pixels decode to the zero vector."""
    normals = rgb.astype(np.float32).transpose(2, 0, 1) * (2.0 / 255.0) - 1.0
    normals[:, rgb.sum(axis=2) == 0] = 0.0
    return normals


def _masked_bce(raw: torch.Tensor, target: torch.Tensor, pos_weight: float | None) -> torch.Tensor:
    """BCE over non-ignored pixels; with ``pos_weight`` positives count ``w`` and negatives ``1 - w``."""
    valid = target != IGNORE_INDEX
    label = torch.where(valid, target, torch.zeros_like(target)).float()
    per_pixel = F.binary_cross_entropy_with_logits(raw.float(), label, reduction="none")
    if pos_weight is not None:
        per_pixel = per_pixel * (label * pos_weight + (1 - label) * (1 - pos_weight))
    return _valid_mean(per_pixel, valid)


@dataclass(frozen=True)
class ProbabilityMapTask(Task):
    """A binary map predicted as a probability (sigmoid of one logit); saved as PNG 0..255."""

    prediction: ClassVar[str] = "probability in [0, 1] (float32)"
    file_format: ClassVar[str] = "8-bit greyscale PNG, probability * 255"

    def predict(self, raw: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(raw.float())

    def label_relation(self, thresholds: ContrastiveConfig) -> LabelRelation:
        return ClassRelation(binary=True)

    def colorize(self, value: torch.Tensor | np.ndarray) -> np.ndarray:
        array = _plane(value).astype(np.float32)
        grey = np.where(array == IGNORE_INDEX, 0.5, np.clip(array, 0, 1))
        return np.repeat((grey * 255).astype(np.uint8)[..., None], 3, axis=2)

    def save(self, prediction: torch.Tensor | np.ndarray, stem: Path) -> Path:
        path = stem.with_suffix(".png")
        array = _plane(prediction).astype(np.float32)
        Image.fromarray(np.clip(np.rint(array * 255), 0, 255).astype(np.uint8)).save(path)
        return path

    def load(self, path: Path) -> torch.Tensor:
        raw = _read_png(path)
        if raw.ndim == 3:
            raw = raw[..., 0]
        scale = 65535.0 if raw.dtype == np.uint16 else 255.0
        return torch.from_numpy(raw.astype(np.float32) / scale)[None]


@dataclass(frozen=True)
class EdgeTask(ProbabilityMapTask):
    """Boundaries: balanced BCE with positive weight 0.95 (as the field trains them)."""

    name: ClassVar[str] = "edge"
    default_weight: ClassVar[float] = 50.0
    primary_metric: ClassVar[str] = "odsF"
    costly_metric: ClassVar[bool] = True
    pos_weight: float = 0.95

    def loss(self, raw: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return _masked_bce(raw, target, self.pos_weight)

    @classmethod
    def target_problems(cls, target: np.ndarray, path: Path) -> list[str]:
        if ((target < 0) | (target > 1)).any():
            return [f"{path}: edge values outside [0, 1] (min {target.min():.3g}, max {target.max():.3g})"]
        return []

    def build_metric(self, info: DatasetInfo, eval_config: EvalConfig) -> Metric:
        from densemtl.metrics.boundary import BoundaryMetric

        max_dist = eval_config.boundary_max_dist or info.boundary_max_dist
        return BoundaryMetric(
            max_dist=max_dist,
            thresholds=eval_config.boundary_thresholds,
            matcher=eval_config.boundary_matcher,
            protocol=eval_config.edge_protocol,
        )


@dataclass(frozen=True)
class SaliencyTask(ProbabilityMapTask):
    """Salient objects: plain BCE; evaluated by maxF on dataset-level counts."""

    name: ClassVar[str] = "saliency"
    default_weight: ClassVar[float] = 5.0
    primary_metric: ClassVar[str] = "maxF"

    def loss(self, raw: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return _masked_bce(raw, target, pos_weight=None)

    def build_metric(self, info: DatasetInfo, eval_config: EvalConfig) -> Metric:
        from densemtl.metrics.saliency import SaliencyMetric

        return SaliencyMetric(thresholds=eval_config.saliency_thresholds)

    @classmethod
    def delta_m_metric(cls, eval_config: EvalConfig | None) -> str:
        """maxF, as the field's tables, or MTL-PyTorch's mIoU (``eval.delta_m_saliency``)."""
        return eval_config.delta_m_saliency if eval_config is not None else cls.primary_metric


def build_task(name: str, info: DatasetInfo, normals_loss: str = "l1") -> Task:
    """The task ``name`` configured for a dataset (class count and names come from ``info``)."""
    if name not in TASKS:
        raise DataError(f"unknown task '{name}' (known: {', '.join(TASKS)})")
    cls = TASKS[name]
    if issubclass(cls, ClassMapTask):
        if name not in info.num_classes:
            raise DataError(f"dataset '{info.name}' has no labels for task '{name}'")
        names = info.class_names.get(name)
        return cls(num_classes=info.num_classes[name], class_names=tuple(names) if names else None)
    if cls is NormalsTask:
        return NormalsTask(cosine_loss=normals_loss == "cosine")
    return cls()


def build_tasks(names: list[str], info: DatasetInfo, normals_loss: str = "l1") -> dict[str, Task]:
    return {name: build_task(name, info, normals_loss) for name in names}
