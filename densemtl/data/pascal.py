"""PASCAL-Context multi-task benchmark (4998 train / 5105 val), read as the field's loaders read it.

==============  ============================================  ==========================================
task            file                                          target
==============  ============================================  ==========================================
image           ``JPEGImages/<name>.jpg``                      RGB
semseg          ``semseg/VOC12/<name>.png`` if present, else   0 background, 1..20 VOC classes, 255 ignore
                ``semseg/pascal-context/<name>.png``
human_parts     ``human_parts/<name>.mat`` (PASCAL-Part)       see :mod:`densemtl.data.pascal_parts`
normals         ``normals_distill/<name>.png`` (uint8)         ``2v/255 - 1``; zero vector where invalid
saliency        ``sal_distill/<name>.png`` (uint8)             1 where ``v/255 > 0.5``, else 0
edge            ``pascal-context/trainval/<name>.mat``         thinned ``LabelMap`` boundaries
==============  ============================================  ==========================================

Splits: ``ImageSets/Context/<split>.txt``.

Edges for training, as the field's loaders compute them: the 4-neighbour Laplacian of ``LabelMap``
(kernel ``[[0,1,0],[1,-4,1],[0,1,0]]``, reflected borders without repeating the edge pixel, as
OpenCV's default) is non-zero where a pixel's label differs from its neighbours in a way that does
not cancel out; those pixels are thinned to one-pixel-wide lines (``skimage.morphology.thin``).
Evaluation (``train=False``) scores against what SEISM builds from the same ``LabelMap`` instead:
``thin(seg2bmap(LabelMap))`` (:func:`densemtl.metrics.edge_protocols.seism_boundaries`).

Normals were distilled from a NYUD-trained network, so the field keeps them only on PASCAL-Context
classes that NYUD also labels: the ``LabelMap`` ids in :data:`NORMALS_VALID_CONTEXT_IDS`, the classes
whose name appears in both the 459-class PASCAL-Context list and the NYUD-v2 class list (without
"unknown"), plus ``tvmonitor`` (427). Pixels of other classes, and all-zero PNG pixels, are invalid.
The 170 ids equal those the reference loaders derive from their ``nyu_classes.json`` (894 NYUD
names) and ``context_classes.json`` (459 PASCAL-Context names), checked name by name.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from densemtl.config import DataConfig
from densemtl.data.files import FolderDataset, as_label_map, check_labels, read_image_file, read_mat
from densemtl.data.pascal_parts import PART_CLASS_NAMES, load_human_parts
from densemtl.dataset_info import DatasetInfo
from densemtl.errors import DataError
from densemtl.metrics.edge_protocols import seism_boundaries
from densemtl.tasks import decode_normals

VOC_CLASS_NAMES = [
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
]
PASCAL_BOUNDARY_MAX_DIST = 0.0075
PASCAL_EVAL_SIZE = (512, 512)  # images are at most 500 pixels a side; evaluation pads them into this
NORMALS_VALID_CONTEXT_IDS = frozenset({
    3, 4, 6, 9, 10, 11, 13, 15, 17, 18, 22, 23, 29, 30, 33, 34, 36, 37, 38, 39, 41, 43, 46, 49, 50, 51, 53,
    55, 56, 59, 61, 62, 65, 66, 68, 69, 72, 73, 78, 83, 84, 85, 87, 88, 95, 96, 101, 104, 105, 107, 111, 113,
    115, 122, 124, 135, 141, 142, 143, 146, 150, 154, 157, 158, 159, 165, 172, 174, 181, 183, 184, 191, 193,
    195, 197, 199, 202, 213, 215, 216, 219, 220, 223, 225, 228, 230, 232, 233, 238, 239, 242, 243, 246, 250,
    251, 252, 255, 260, 261, 263, 269, 272, 273, 275, 281, 283, 284, 285, 286, 287, 288, 290, 291, 292, 293,
    295, 304, 307, 309, 310, 314, 315, 319, 323, 329, 330, 331, 336, 342, 345, 349, 350, 351, 352, 355, 357,
    368, 370, 371, 374, 379, 380, 383, 384, 397, 401, 403, 405, 407, 408, 411, 412, 413, 414, 417, 419, 421,
    423, 427, 429, 430, 432, 440, 441, 442, 443, 444, 446, 454, 457,
})
_NORMALS_VALID_ARRAY = np.array(sorted(NORMALS_VALID_CONTEXT_IDS))
_SOURCES = {
    "image": ("JPEGImages/{name}.jpg",),
    "semseg": ("semseg/VOC12/{name}.png", "semseg/pascal-context/{name}.png"),
    "human_parts": ("human_parts/{name}.mat",),
    "normals": ("normals_distill/{name}.png",),
    "saliency": ("sal_distill/{name}.png",),
    "labelmap": ("pascal-context/trainval/{name}.mat",),
}


def read_labelmap(path: Path) -> np.ndarray:
    """The PASCAL-Context ``LabelMap`` (ids of the 459 classes) as int64 H x W."""
    labelmap = read_mat(path, "LabelMap")
    if labelmap.ndim != 2:
        raise DataError(f"{path}: LabelMap should be H x W, got shape {labelmap.shape}")
    return np.rint(labelmap).astype(np.int64) if labelmap.dtype.kind == "f" else labelmap.astype(np.int64)


def label_boundaries(labelmap: np.ndarray) -> np.ndarray:
    """Thinned boundaries of a label map as float32 H x W (1 = boundary), as the field derives edges."""
    from skimage.morphology import thin

    padded = np.pad(labelmap.astype(np.int64), 1, mode="reflect")
    laplacian = (
        padded[:-2, 1:-1] + padded[2:, 1:-1] + padded[1:-1, :-2] + padded[1:-1, 2:] - 4 * padded[1:-1, 1:-1]
    )
    return thin(laplacian != 0).astype(np.float32)


def read_semseg(path: Path) -> np.ndarray:
    labels = as_label_map(read_image_file(path), path)
    check_labels(labels, len(VOC_CLASS_NAMES), path)
    return labels


def read_normals(path: Path, labelmap: np.ndarray) -> np.ndarray:
    """Distilled normals 3 x H x W, zeroed outside the NYUD-compatible classes of ``labelmap``."""
    encoded = read_image_file(path)
    if encoded.ndim != 3 or encoded.shape[2] < 3 or encoded.dtype != np.uint8:
        raise DataError(f"{path}: expected an 8-bit RGB normals PNG, got {encoded.dtype} {encoded.shape}")
    if encoded.shape[:2] != labelmap.shape:
        raise DataError(f"{path}: normals are {encoded.shape[:2]}, the LabelMap {labelmap.shape}")
    valid = np.isin(labelmap, _NORMALS_VALID_ARRAY)
    return decode_normals(encoded[..., :3]) * valid[None].astype(np.float32)


def _labelmap(files: dict[str, Path], cache: dict[str, Any]) -> np.ndarray:
    """The sample's LabelMap, read once for the tasks derived from it."""
    if "labelmap" not in cache:
        cache["labelmap"] = read_labelmap(files["labelmap"])
    return cache["labelmap"]


def read_saliency(path: Path) -> np.ndarray:
    """Distilled saliency binarised at 0.5 (``v / 255 > 0.5``), 1 x H x W float."""
    grey = read_image_file(path)
    grey = grey[..., 0] if grey.ndim == 3 else grey
    if grey.ndim != 2:
        raise DataError(f"{path}: expected a grey saliency PNG, got shape {grey.shape}")
    scale = 65535.0 if grey.dtype == np.uint16 else 255.0
    return (grey.astype(np.float32) / scale > 0.5).astype(np.float32)[None]


# The files each task reads: edges are the LabelMap's boundaries, normals are valid on its NYUD-like classes.
_TASK_SOURCES = {"semseg": ("semseg",), "human_parts": ("human_parts",), "saliency": ("saliency",),
                 "normals": ("normals", "labelmap"), "edge": ("labelmap",)}
# Per task: its target from the sample's files, the image size and the per-sample cache.
_READERS: dict[str, Callable[[dict[str, Path], tuple[int, int], dict[str, Any]], np.ndarray]] = {
    "semseg": lambda files, size, cache: read_semseg(files["semseg"]),
    "human_parts": lambda files, size, cache: load_human_parts(files["human_parts"], size),
    "saliency": lambda files, size, cache: read_saliency(files["saliency"]),
    "normals": lambda files, size, cache: read_normals(files["normals"], _labelmap(files, cache)),
    "edge": lambda files, size, cache: label_boundaries(_labelmap(files, cache))[None],
}


class PascalContextDataset(FolderDataset):
    """PASCAL-Context for semseg, human_parts, normals, saliency, edge; ``ImageSets/Context/<split>.txt``."""

    dataset_name = "pascal"
    title = "PASCAL-Context"
    supported_tasks = ("semseg", "human_parts", "normals", "saliency", "edge")
    markers = ("ImageSets/Context", "JPEGImages")
    task_sources = {"edge": "labelmap"}
    # boundaries are scored against SEISM's thin(seg2bmap(LabelMap)), not the training edges
    evaluation_targets = {"edge": lambda target, cache: seism_boundaries(cache["labelmap"])[None]}

    @classmethod
    def split_file(cls, root: Path, split: str) -> Path:
        return Path(root) / "ImageSets" / "Context" / f"{split}.txt"

    @classmethod
    def sources(cls, root: Path, tasks: Iterable[str]) -> dict[str, tuple[str, ...]]:
        wanted = ["image", *(source for task in tasks for source in _TASK_SOURCES[task])]
        return {source: _SOURCES[source] for source in dict.fromkeys(wanted)}

    @classmethod
    def read_target(
        cls, task: str, files: dict[str, Path], size: tuple[int, int], cache: dict[str, Any]
    ) -> np.ndarray:
        return _READERS[task](files, size, cache)

    @classmethod
    def dataset_info(cls, tasks: Iterable[str]) -> DatasetInfo:
        """PASCAL-Context facts: 21 VOC classes, 7 human-part classes, boundary tolerance 0.0075."""
        return DatasetInfo(
            name=cls.dataset_name,
            tasks=tuple(tasks),
            num_classes={"semseg": len(VOC_CLASS_NAMES), "human_parts": len(PART_CLASS_NAMES)},
            class_names={"semseg": list(VOC_CLASS_NAMES), "human_parts": list(PART_CLASS_NAMES)},
            boundary_max_dist=PASCAL_BOUNDARY_MAX_DIST,
        )

    @classmethod
    def native_size(cls, data_config: DataConfig) -> tuple[int, int]:
        return PASCAL_EVAL_SIZE

    @classmethod
    def config_problems(cls, data_config: DataConfig, train: bool) -> list[tuple[str, str]]:
        problems = []
        if train and data_config.crop_size is None and data_config.batch_size > 1:
            why = "PASCAL-Context images differ in size: set a crop (e.g. [512, 512]) to batch them"
            problems.append(("data.crop_size", why))
        return problems + super().config_problems(data_config, train)
