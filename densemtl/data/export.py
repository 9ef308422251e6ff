"""Write the synthetic dataset to disk in the NYUD-v2 layout (ATRC / InvPT ``NYUDv2`` variant).

Layout under ``out``::

    images/<name>.png          RGB
    segmentation/<name>.png    uint8, file value = class id + 1 (0 = void, unused here)
    depth/<name>.npy           float32 metres (0 = invalid, unused here)
    normals/<name>.png         uint8 RGB, decode with 2 v / 255 - 1 (camera frame, see data/synthetic/)
    edge/<name>.png            uint8, 255 = boundary
    saliency/<name>.png        uint8, 255 = salient (not part of NYUD-v2; our extra task)
    gt_sets/{train,val,test}.txt   one name per line
    classes.txt                class names, line i = class id i (file value i + 1)
    grid.png                   with ``grid=True``: a few frames, one column per label
    clips/clip<i>/<frame>.png  with ``clips=True``: each video clip as a folder of consecutive frames
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from densemtl.config import SyntheticConfig
from densemtl.data.synthetic.dataset import SPLITS, SYNTHETIC_TASKS, load_split, split_size, synthetic_info
from densemtl.data.synthetic.scene import CLASS_NAMES
from densemtl.errors import DataError
from densemtl.tasks import build_tasks, encode_normals


def _save_png(array: np.ndarray, path: Path) -> None:
    Image.fromarray(array).save(path)


def _save_binary(value: np.ndarray, path: Path) -> None:
    _save_png((value * 255).astype(np.uint8), path)


# Per task: the folder, file extension and writer of one frame's label in the layout's encoding.
_LABEL_FILES: dict[str, tuple[str, str, Callable[[np.ndarray, Path], None]]] = {
    "semseg": ("segmentation", ".png", lambda value, path: _save_png((value + 1).astype(np.uint8), path)),
    "depth": ("depth", ".npy", lambda value, path: np.save(path, value.astype(np.float32))),
    "normals": ("normals", ".png", lambda value, path: _save_png(encode_normals(value), path)),
    "edge": ("edge", ".png", _save_binary),
    "saliency": ("saliency", ".png", _save_binary),
}
_FOLDERS = ("images", *(folder for folder, _, _ in _LABEL_FILES.values()), "gt_sets")


def _write_frame(out: Path, name: str, arrays: dict[str, np.ndarray], index: int) -> None:
    _save_png(arrays["image"][index], out / "images" / f"{name}.png")
    for task, (folder, extension, write) in _LABEL_FILES.items():
        write(arrays[task][index], out / folder / f"{name}{extension}")


def label_grid(arrays: dict[str, np.ndarray], indices: list[int], gap: int = 2) -> np.ndarray:
    """An RGB picture: one row per frame, columns image, semseg, depth, normals, edge, saliency."""
    tasks = build_tasks(list(SYNTHETIC_TASKS), synthetic_info())
    rows = []
    for index in indices:
        cells = [arrays["image"][index]] + [tasks[name].colorize(arrays[name][index]) for name in SYNTHETIC_TASKS]
        height = cells[0].shape[0]
        spacer = np.full((height, gap, 3), 255, np.uint8)
        row = np.concatenate([part for cell in cells for part in (cell, spacer)][:-1], axis=1)
        rows.extend([row, np.full((gap, row.shape[1], 3), 255, np.uint8)])
    return np.concatenate(rows[:-1], axis=0)


def export_clips(synthetic_config: SyntheticConfig, out: Path) -> Path:
    """Write the video clips as ``out/clips/clip<i>/<frame>.png``, one folder of consecutive frames per clip
    (what ``predict --video`` takes); returns ``out/clips``."""
    images = load_split(synthetic_config, "clips")["image"]
    length = synthetic_config.clip_length
    for clip in range(synthetic_config.num_clips):
        folder = out / "clips" / f"clip{clip:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        for frame in range(length):
            _save_png(images[clip * length + frame], folder / f"{frame:04d}.png")
    return out / "clips"


def export_synthetic(synthetic_config: SyntheticConfig, out: Path, grid: bool = False, clips: bool = False) -> Path:
    """Write every split (rendered or read from the cache) under ``out``, and the video clips with ``clips``;
    returns ``out``."""
    try:
        for folder in _FOLDERS:
            (out / folder).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(f"{out}: cannot create the export folder ({err.strerror})") from None
    (out / "classes.txt").write_text("\n".join(CLASS_NAMES) + "\n")
    shown: dict[str, np.ndarray] | None = None  # the frames of the grid: val, else the first split written
    for split in SPLITS:
        if split_size(synthetic_config, split) <= 0:
            continue
        arrays = load_split(synthetic_config, split)
        names = [f"{split}_{index:05d}" for index in range(len(arrays["image"]))]
        for index, name in enumerate(tqdm(names, desc=f"export {split}", unit="frame")):
            _write_frame(out, name, arrays, index)
        (out / "gt_sets" / f"{split}.txt").write_text("\n".join(names) + "\n")
        if shown is None or split == "val":
            shown = arrays
    if grid and shown is not None:
        picture = label_grid(shown, list(range(min(4, len(shown["image"])))))
        Image.fromarray(picture).save(out / "grid.png", optimize=True)
    if clips:
        export_clips(synthetic_config, out)
    print(f"synthetic dataset written to {out} (NYUD-v2 layout{', clips/' if clips else ''})")
    return out
