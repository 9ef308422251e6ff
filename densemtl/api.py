"""The Python API: ``model = densemtl.load(PATH)`` and ``model.predict(image)``.

``PATH`` is a training checkpoint or a folder written by ``densemtl export``. Predictions come from the
architecture's deployed form (what ``evaluate`` scores) at the image's own size, one image at a time, as
NumPy arrays in each task's natural units (``Task.prediction``: class ids, metres, unit normals,
probabilities), H x W for one channel and H x W x C for several.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from densemtl.config import Config
from densemtl.data.transforms import normalize_image
from densemtl.dataset_info import DatasetInfo
from densemtl.engine.checkpoint import load_model
from densemtl.errors import UserError
from densemtl.registry import ARCHITECTURES
from densemtl.tasks import Task


def as_rgb(image: Any) -> np.ndarray:
    """A PIL image (EXIF orientation applied) or an array (H x W grey or H x W x 3/4; uint8, or float in [0, 1])
    as an H x W x 3 uint8 RGB array."""
    if isinstance(image, Image.Image):
        return np.array(ImageOps.exif_transpose(image).convert("RGB"))
    if not isinstance(image, np.ndarray):
        raise UserError(f"predict: expected a NumPy array or a PIL image, got {type(image).__name__}")
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (3, 4) or min(image.shape[:2]) < 1:
        raise UserError(f"predict: expected an H x W x 3 RGB array (or H x W grey), got shape {image.shape}")
    image = image[..., :3]
    if image.dtype == np.uint8:
        return image
    if np.issubdtype(image.dtype, np.floating) and np.isfinite(image).all() and 0 <= image.min() <= image.max() <= 1:
        return np.rint(image * 255).astype(np.uint8)
    raise UserError(f"predict: expected uint8 values or floats in [0, 1], got {image.dtype} "
                    f"in [{image.min()}, {image.max()}]")


class Model:
    """A trained multi-task model ready to predict: :attr:`tasks`, :meth:`predict`."""

    def __init__(self, path: str | Path, device: str | torch.device = "cpu") -> None:
        try:
            self.device = torch.device(device)
            torch.empty(0, device=self.device)
        except (RuntimeError, AssertionError) as err:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UserError(f"load: device '{device}' cannot be used ({reason})") from None
        loaded = load_model(path, self.device)
        self.path = Path(path)
        self.config: Config = loaded.config
        self.info: DatasetInfo = loaded.info
        self.tasks: dict[str, Task] = loaded.tasks
        self.network = ARCHITECTURES.lookup(self.config.model.arch).deployed(loaded.model, self.config)

    def __repr__(self) -> str:
        return f"<densemtl {self.config.model.arch} model from {self.path}: {', '.join(self.tasks)} on {self.device}>"

    @torch.inference_mode()
    def predict(self, image: Any) -> dict[str, np.ndarray]:
        """``{task: array}`` for one image (NumPy array or PIL image, any size), at the image's size."""
        batch = normalize_image(as_rgb(image))[None].to(self.device)
        raw = self.network(batch)["pred"]
        outputs = {}
        for name, task in self.tasks.items():
            prediction = task.predict(raw[name].float())[0].cpu().numpy()
            if prediction.ndim == 3:  # C x H x W: one channel squeezed, several moved last
                prediction = prediction[0] if prediction.shape[0] == 1 else np.moveaxis(prediction, 0, -1)
            outputs[name] = prediction
        return outputs


def load(path: str | Path, device: str | torch.device = "cpu") -> Model:
    """The model of a training checkpoint or an exported folder, on ``device`` (CPU unless told)."""
    return Model(path, device)
