"""NYUD-v2 (795 train / 654 val, 40 classes) in both layouts the field distributes, read as the field does.

=============  ===============================  =====================================================
source         ``NYUD_MT`` (MTI-Net)            ``NYUDv2`` (ATRC / InvPT)
=============  ===============================  =====================================================
images         ``images/*.jpg``                 ``images/*.png``
semseg         ``segmentation/*.png``           same
depth          ``depth/*.npy`` (metres)         same
normals        ``normals/*.npy`` (H x W x 3)    ``normals/*.png`` (uint8, ``2v/255 - 1``)
edge           ``edge/*.npy``                   ``edge/*.png`` (``/255``)
splits         ``gt_sets/{train,val}.txt``      same
=============  ===============================  =====================================================

The layout is detected from the image files. Each file is looked up with the layout's extension
first and the other one second, so a folder mixing both (or depth as a 16-bit PNG in millimetres)
still loads. Conventions: semseg file value 0 (void) -> 255, 1..40 -> 0..39; depth 0 = no
measurement (non-finite or negative values are treated as 0); normals all-zero = invalid; edge in
[0, 1]. Evaluation runs at the native size (``train=False`` leaves samples unresized) and scores
boundaries against SEISM's ground truth ``thin(seg2bmap(edge))`` of the stored map.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from densemtl.config import DataConfig
from densemtl.data.files import FolderDataset, as_label_map, read_image_file, read_npy
from densemtl.dataset_info import DatasetInfo
from densemtl.errors import DataError
from densemtl.metrics.edge_protocols import seism_boundaries
from densemtl.tasks import DepthTask, EdgeTask, NormalsTask

NYUD_CLASS_NAMES = [
    "wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window", "bookshelf",
    "picture", "counter", "blinds", "desk", "shelves", "curtain", "dresser", "pillow", "mirror",
    "floor mat", "clothes", "ceiling", "books", "refrigerator", "television", "paper", "towel",
    "shower curtain", "box", "whiteboard", "person", "night stand", "toilet", "sink", "lamp", "bathtub",
    "bag", "other structure", "other furniture", "other prop",
]
NYUD_NUM_CLASSES = 40
NYUD_BOUNDARY_MAX_DIST = 0.011
NYUD_IMAGE_SIZE = (480, 640)  # every image, (H, W)
LAYOUTS = ("NYUD_MT", "NYUDv2")
_FOLDERS = {"image": "images", "semseg": "segmentation", "depth": "depth", "normals": "normals", "edge": "edge"}
_EXTENSIONS = {  # per layout, per source: the layout's own extension first
    "NYUD_MT": {"image": (".jpg", ".png"), "semseg": (".png",), "depth": (".npy", ".png"),
                "normals": (".npy", ".png"), "edge": (".npy", ".png")},
    "NYUDv2": {"image": (".png", ".jpg"), "semseg": (".png",), "depth": (".npy", ".png"),
               "normals": (".png", ".npy"), "edge": (".png", ".npy")},
}


def detect_layout(root: Path) -> str:
    """``"NYUD_MT"`` when ``images/`` holds JPEGs, ``"NYUDv2"`` when it holds PNGs."""
    images = Path(root) / "images"
    if not images.is_dir():
        raise DataError(f"{images}: folder not found (is {root} a NYUD-v2 folder?)")
    if next(images.glob("*.jpg"), None) is not None:
        return "NYUD_MT"
    if next(images.glob("*.png"), None) is not None:
        return "NYUDv2"
    raise DataError(f"{images}: no .jpg or .png images, cannot tell the NYUD layout")


def read_semseg(path: Path) -> np.ndarray:
    """Class map: file 0 (void) -> 255, 1..40 -> 0..39; 8- or 16-bit PNG."""
    labels = as_label_map(read_image_file(path), path)
    if labels.max(initial=0) > NYUD_NUM_CLASSES:
        raise DataError(f"{path}: label values up to {labels.max()} (NYUD files hold 0..{NYUD_NUM_CLASSES})")
    return np.where(labels == 0, 255, labels - 1)


def read_depth(path: Path) -> np.ndarray:
    """Depth in metres, 1 x H x W, 0 = no measurement (``.npy`` metres or 16-bit PNG millimetres)."""
    if path.suffix == ".npy":
        depth = np.squeeze(read_npy(path)).astype(np.float32)
        if depth.ndim != 2:
            raise DataError(f"{path}: expected an H x W depth map, got shape {depth.shape}")
    else:
        depth = DepthTask().load(path).numpy()[0]
    return np.where(np.isfinite(depth) & (depth > 0), depth, 0).astype(np.float32)[None]


def read_normals(path: Path) -> np.ndarray:
    """Normals 3 x H x W: float ``.npy`` (H x W x 3) or uint8 PNG decoded ``2v/255 - 1``; zero = invalid."""
    if path.suffix == ".npy":
        normals = read_npy(path).astype(np.float32)
        if normals.ndim != 3 or normals.shape[-1] != 3:
            raise DataError(f"{path}: expected an H x W x 3 normals array, got shape {normals.shape}")
        normals = normals.transpose(2, 0, 1)
    else:
        normals = NormalsTask().load(path).numpy()
    return np.where(np.isfinite(normals), normals, 0).astype(np.float32)


def read_edge(path: Path) -> np.ndarray:
    """Boundary map 1 x H x W in [0, 1]: float ``.npy`` as stored, PNG divided by 255."""
    if path.suffix == ".npy":
        edge = np.squeeze(read_npy(path)).astype(np.float32)
        if edge.ndim != 2:
            raise DataError(f"{path}: expected an H x W edge map, got shape {edge.shape}")
        return edge[None]
    return EdgeTask().load(path).numpy()


_READERS = {"semseg": read_semseg, "depth": read_depth, "normals": read_normals, "edge": read_edge}


class NYUDDataset(FolderDataset):
    """NYUD-v2 for the tasks semseg, depth, normals, edge; ``split`` names ``gt_sets/<split>.txt``."""

    dataset_name = "nyud"
    title = "NYUD-v2"
    supported_tasks = ("semseg", "depth", "normals", "edge")
    markers = ("gt_sets",)
    # boundaries are scored against SEISM's thin(seg2bmap(stored edge map)), as its db_gt.m feeds it
    evaluation_targets = {"edge": lambda target, cache: seism_boundaries(target[0])[None]}

    def __init__(self, data_config: DataConfig, split: str, train: bool) -> None:
        super().__init__(data_config, split, train)
        self.layout = detect_layout(self.root)

    @classmethod
    def describe_layout(cls, root: Path) -> str:
        return f" (layout {detect_layout(root)})"

    @classmethod
    def split_file(cls, root: Path, split: str) -> Path:
        return Path(root) / "gt_sets" / f"{split}.txt"

    @classmethod
    def sources(cls, root: Path, tasks: Iterable[str]) -> dict[str, tuple[str, ...]]:
        extensions = _EXTENSIONS[detect_layout(root)]
        return {
            source: tuple(f"{_FOLDERS[source]}/{{name}}{ext}" for ext in extensions[source])
            for source in ("image", *tasks)
        }

    @classmethod
    def read_target(
        cls, task: str, files: dict[str, Path], size: tuple[int, int], cache: dict[str, Any]
    ) -> np.ndarray:
        return _READERS[task](files[task])

    @classmethod
    def dataset_info(cls, tasks: Iterable[str]) -> DatasetInfo:
        """NYUD-v2 facts: 40 classes, boundary tolerance 0.011 of the diagonal."""
        return DatasetInfo(
            name=cls.dataset_name,
            tasks=tuple(tasks),
            num_classes={"semseg": NYUD_NUM_CLASSES},
            class_names={"semseg": list(NYUD_CLASS_NAMES)},
            boundary_max_dist=NYUD_BOUNDARY_MAX_DIST,
        )

    @classmethod
    def native_size(cls, data_config: DataConfig) -> tuple[int, int]:
        return NYUD_IMAGE_SIZE
