"""``densemtl predict``: run a trained checkpoint on image files and write every task's map.

For each image ``<name>.<ext>`` it writes ``out/<task>/<name>.<ext>`` in the task's on-disk encoding
(:meth:`Task.save`: class-id PNG, depth ``.npy`` in metres, normals PNG, edge/saliency 8-bit PNG) and a
colour panel ``out/panels/<name>.png`` (the image, then each task's colourised prediction).
Images are processed one at a time at their native resolution.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from tqdm import tqdm

from densemtl.data.transforms import normalize_image
from densemtl.engine.checkpoint import load_model
from densemtl.engine.distributed import DistInfo, resolve_device
from densemtl.errors import DataError, UserError
from densemtl.tasks import Task

_WIDE_GREY = {"I;16", "I;16B", "I;16L", "I;16N", "I"}  # integer grey modes holding more than 8 bits


def check_image_path(path: Path) -> None:
    """A DataError naming ``path`` when it is a folder or no file."""
    if path.is_dir():
        raise DataError(f"{path}: a folder, not an image (add --video to predict its frames in order)")
    if not path.is_file():
        raise DataError(f"{path}: image not found")


def read_image(path: Path) -> np.ndarray:
    """An RGB uint8 H x W x 3 array as the picture is meant to be seen: turned by its EXIF orientation, and
    16-bit grey scaled to 8 bits (``v / 257``, where converting would clip everything over 255 to white).

    A missing or unreadable file is a :class:`DataError` naming it.
    """
    check_image_path(path)
    try:
        with Image.open(path) as image:
            upright = ImageOps.exif_transpose(image)
            if upright.mode in _WIDE_GREY:
                grey = np.clip(np.rint(np.asarray(upright, dtype=np.float64) / 257.0), 0, 255).astype(np.uint8)
                return np.repeat(grey[..., None], 3, axis=2)
            return np.array(upright.convert("RGB"))
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: cannot read image ({err})") from None


def save_predictions(
    rgb: np.ndarray, tasks: dict[str, Task], raw: dict[str, torch.Tensor], out: Path, stem: str
) -> tuple[list[Path], np.ndarray]:
    """Write each task's map of one image (raw outputs of batch 1) and its colour panel ``out/panels/<stem>.png``
    (the image, then each task's colourised prediction); returns the files written and the panel."""
    written, pictures = [], [rgb]
    for name, task in tasks.items():
        prediction = task.predict(raw[name].float())[0].cpu()
        written.append(task.save(prediction, out / name / stem))
        pictures.append(task.colorize(prediction))
    panel = np.concatenate(pictures, axis=1)
    written.append(out / "panels" / f"{stem}.png")
    Image.fromarray(panel).save(written[-1])
    return written, panel


def predict_images(checkpoint: Path, images: list[Path], out: Path, device: str | None = None) -> list[Path]:
    """Write the predictions of ``checkpoint`` for ``images`` under ``out``; returns the files written."""
    stems = [Path(p).stem for p in images]
    duplicates = sorted({s for s in stems if stems.count(s) > 1})
    if duplicates:
        raise UserError(f"predict: several images are named {', '.join(duplicates)}; outputs would overwrite")
    target = resolve_device(device or "auto", DistInfo())
    loaded = load_model(checkpoint, target)
    for path in images:  # before any is predicted
        check_image_path(Path(path))
    out = Path(out)
    for name in [*loaded.tasks, "panels"]:
        (out / name).mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for path in tqdm(images, desc="predict", unit="image"):
        path = Path(path)
        rgb = read_image(path)
        with torch.no_grad():
            raw = loaded.model(normalize_image(rgb)[None].to(target))["pred"]
        written += save_predictions(rgb, loaded.tasks, raw, out, path.stem)[0]
    print(f"predictions of {len(images)} image(s) written to {out} ({', '.join(loaded.tasks)}, panels)")
    return written
