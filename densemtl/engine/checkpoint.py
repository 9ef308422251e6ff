"""Checkpoints: written atomically, read back with ``torch.load(weights_only=True)``.

A training checkpoint is a dict with ``config`` (plain dict), ``info`` (the dataset facts tasks need),
``model``, ``optimizer``, ``scheduler``, ``scaler``, ``objective`` (the balancer's and regularizer's state;
``balancer`` in older checkpoints), ``ema`` (or None), ``rng``, ``step``,
``data_position`` (``{"epoch", "batch"}``: the next batch to load) and ``best`` (the best-checkpoint
bookkeeping). Everything in it is a tensor, a number, a string or a list/dict of those, so that loading
never needs to unpickle arbitrary objects.
"""

from __future__ import annotations

import pickle
import random
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from densemtl.atomic import atomic_write
from densemtl.config import Config
from densemtl.dataset_info import DatasetInfo
from densemtl.engine.model_folder import read_model_folder
from densemtl.errors import UserError
from densemtl.tasks import Task


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``path`` atomically: an interrupted write never leaves a truncated ``last.pt``."""
    path = Path(path)
    with atomic_write(path) as stream:
        torch.save(state, stream)
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint on the CPU; a missing or unreadable file is a :class:`UserError` naming it.

    A folder written by ``densemtl export`` is read as the same kind of state
    (:func:`densemtl.engine.model_folder.read_model_folder`).
    """
    path = Path(path)
    if path.is_dir():
        return read_model_folder(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{path}: not a readable checkpoint ({first_line})") from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise UserError(f"{path}: not a densemtl checkpoint (no 'model' and 'config' entries)")
    return state


def info_to_dict(info: DatasetInfo) -> dict[str, Any]:
    """The dataset facts as plain data, so a checkpoint can rebuild its tasks without the dataset."""
    data = asdict(info)
    data["tasks"] = list(info.tasks)
    return data


def info_from_dict(data: dict[str, Any]) -> DatasetInfo:
    return DatasetInfo(**{**data, "tasks": tuple(data["tasks"])})


def capture_rng() -> dict[str, Any]:
    """Python, NumPy and torch (CPU and CUDA) generator states as tensors and lists."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": version, "state": list(internal), "gauss": gauss},
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Put back the states taken by :func:`capture_rng`."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    npy = state["numpy"]
    keys = npy["keys"].numpy().astype(np.uint32)
    np.random.set_state((npy["kind"], keys, npy["pos"], npy["has_gauss"], npy["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class LoadedModel:
    """A trained network rebuilt from a checkpoint, with what is needed to use its outputs."""

    model: nn.Module
    tasks: dict[str, Task]
    config: Config
    info: DatasetInfo
    step: int


def load_model(path: str | Path, device: torch.device | str = "cpu") -> LoadedModel:
    """Rebuild the model of a training checkpoint in eval mode, with the EMA weights when it has them.

    The EMA weights are the ones training validated, so they are the ones to predict with.
    """
    from densemtl.config import from_dict

    state = load_checkpoint(path)
    config = from_dict(state["config"], source=f"{path} (saved config)")
    return model_from_state(state, config, path, device)


def model_from_state(
    state: dict[str, Any], config: Config, path: str | Path, device: torch.device | str = "cpu"
) -> LoadedModel:
    """Build ``config``'s model and load a loaded checkpoint's weights into it (EMA weights when present)."""
    from densemtl.models import build_model
    from densemtl.tasks import build_tasks

    info = info_from_dict(state["info"])
    tasks = build_tasks(config.data.tasks, info, config.loss.normals_loss)
    model = build_model(config, info, tasks)
    weights = state["ema"]["model"] if state.get("ema") else state["model"]
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        source = state.get("weights_file", path)  # an exported folder names its weights file
        raise UserError(f"{source}: weights do not fit the config's model ({str(err).splitlines()[0]})") from None
    return LoadedModel(model.to(device).eval(), tasks, config, info, int(state.get("step", 0)))
