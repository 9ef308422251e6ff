"""Checkpoints: written atomically, read back with ``torch.load(weights_only=True)``.

A training checkpoint is a dict with ``config`` (plain dict), ``info`` (the dataset facts tasks need),
``model``, ``optimizer``, ``scheduler``, ``scaler``, ``objective`` (the balancer's and regularizer's state;
``balancer`` in older checkpoints), ``ema`` (or None), ``rng``, ``step``,
``data_position`` (``{"epoch", "batch"}``: the next batch to load) and ``best`` (the best-checkpoint
bookkeeping). Everything in it is a tensor, a number, a string or a list/dict of those, so that loading
never needs to unpickle arbitrary objects.

Each file also holds ``checksum``, a hash of every tensor's bytes (with its place, dtype and shape), checked
on load: flipped bytes in the tensor data, which torch's reader does not notice, are refused naming the
file. A file that cannot be read, lacks an entry its use needs or fails the checksum is a
:class:`~densemtl.errors.UserError` of one line.
"""

from __future__ import annotations

import random
import re
import warnings
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from densemtl.atomic import atomic_write
from densemtl.config import Config, from_dict, merge_dicts, parse_overrides, read_yaml
from densemtl.dataset_info import DatasetInfo
from densemtl.engine.model_folder import read_model_folder
from densemtl.engine.tensor_tree import iter_tensors, tensors_digest
from densemtl.errors import UserError
from densemtl.tasks import Task

CHECKSUM = "checksum"
MODEL_ENTRIES = ("config", "info", "model")  # what rebuilding the model needs
TRAINING_ENTRIES = (*MODEL_ENTRIES, "optimizer", "scheduler", "scaler", "ema", "rng", "step", "data_position", "best")
_ENTRY_TYPES = {"config": dict, "info": dict, "model": dict, "optimizer": dict, "scheduler": dict, "scaler": dict,
                "rng": list, "step": int, "data_position": dict, "best": dict}


def tensor_checksum(state: dict[str, Any]) -> str:
    """A hash of every tensor of ``state`` (but its own ``checksum`` entry): place, dtype, shape and bytes."""
    return tensors_digest({key: value for key, value in state.items() if key != CHECKSUM})


def nonfinite_tensors(tree: Any) -> list[str]:
    """Paths of the floating-point tensors in ``tree`` holding NaN or infinity (one device sync per device)."""
    by_device: dict[torch.device, list[tuple[str, torch.Tensor]]] = defaultdict(list)
    for path, tensor in iter_tensors(tree):
        if tensor.is_floating_point():
            by_device[tensor.device].append((path, tensor))
    bad = []
    for pairs in by_device.values():
        finite = torch.stack([torch.isfinite(tensor).all() for _, tensor in pairs]).tolist()
        bad += [path for (path, _), ok in zip(pairs, finite, strict=True) if not ok]
    return bad


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` and its checksum to ``path`` atomically: an interrupted write never leaves a truncated
    ``last.pt``."""
    path = Path(path)
    with atomic_write(path) as stream:
        torch.save({**state, CHECKSUM: tensor_checksum(state)}, stream)
    return path


def _unreadable_reason(err: Exception) -> str:
    """The first line of torch's complaint, without its advice to load the file unsafely."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).strip()
    if "weights_only" in text or "Weights only load failed" in text:
        return "it holds Python objects other than tensors, numbers and strings, which are never unpickled"
    return text.splitlines()[0] if text else type(err).__name__


def _structure_problem(state: Any, entries: tuple[str, ...]) -> str | None:
    """Why ``state`` is not a checkpoint with ``entries`` (None when it is)."""
    if not isinstance(state, dict):
        return f"it holds a {type(state).__name__}, not a dict of entries"
    missing = [entry for entry in entries if entry not in state]
    if "optimizer" in entries and "objective" not in state and "balancer" not in state:
        missing.append("objective")
    if missing:
        return f"no {', '.join(repr(entry) for entry in missing)} entr{'y' if len(missing) == 1 else 'ies'}"
    for entry in entries:
        expected = _ENTRY_TYPES.get(entry)
        if expected is not None and not isinstance(state[entry], expected):
            return f"its '{entry}' entry is a {type(state[entry]).__name__}, not a {expected.__name__}"
    tasks = state["info"].get("tasks") if "info" in entries else []
    if not isinstance(tasks, (list, tuple)) or not all(isinstance(task, str) for task in tasks):
        return "its 'info' entry names no tasks"
    return None


def load_checkpoint(path: str | Path, entries: tuple[str, ...] = MODEL_ENTRIES) -> dict[str, Any]:
    """Read a checkpoint on the CPU, check it holds ``entries`` and its checksum; a missing, unreadable,
    incomplete or damaged file is a :class:`UserError` naming it.

    A folder written by ``densemtl export`` is read as the same kind of state
    (:func:`densemtl.engine.model_folder.read_model_folder`), so whatever takes a checkpoint takes a folder.
    """
    path = Path(path)
    if path.is_dir():
        state = read_model_folder(path)  # checks each of its files itself
    elif not path.is_file():
        raise UserError(f"{path}: checkpoint not found")
    else:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch's notes on pickle protocols are no concern of the user
                state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # whatever the decoder raises, the file is not a readable checkpoint
            raise UserError(f"{path}: not a readable checkpoint ({_unreadable_reason(err)})") from None
    problem = _structure_problem(state, entries)
    if problem is not None:
        raise UserError(f"{path}: not a densemtl checkpoint ({problem})")
    saved = state.pop(CHECKSUM, None)  # checkpoints written before checksums (and exported folders) have none
    if saved is not None and saved != tensor_checksum(state):
        raise UserError(f"{path}: damaged checkpoint: its tensor data does not match the checksum written with it")
    return state


# What a run's weights and objective state depend on: a checkpoint does not load into another value.
MODEL_KEYS = ("data.dataset", "data.tasks", "model", "loss.balancer", "contrastive.enabled")
# What a run's optimiser, learning-rate schedule and data order were built from: a resumed run keeps them.
SCHEDULE_KEYS = ("train.lr", "train.weight_decay", "train.schedule", "train.poly_power", "train.warmup_steps",
                 "train.accumulate", "train.seed", "data.batch_size")


def _fields(config: dict[str, Any]) -> dict[str, Any]:
    """A config as plain data, by ``section.field``."""
    return {f"{section}.{key}": value for section, fields in config.items() if isinstance(fields, dict)
            for key, value in fields.items()}


def config_differences(saved: dict[str, Any], current: dict[str, Any], keys: tuple[str, ...]) -> list[str]:
    """``"key (X in the run, Y in the config)"`` for every field under ``keys`` that differs (a field the saved
    config lacks, written before the field existed, is not compared)."""
    old, new = _fields(saved), _fields(current)
    return [
        f"{key} ({old[key]!r} in the run, {new.get(key)!r} in the config)"
        for key in old
        if any(key == prefix or key.startswith(f"{prefix}.") for prefix in keys) and old[key] != new.get(key)
    ]


def check_resumable(state: dict[str, Any], config: dict[str, Any], steps: int, steps_key: str, source: str) -> None:
    """Refuse (one line naming what differs) to resume ``state`` with a config whose model does not fit it or
    whose schedule differs: the steps, learning rate, warm-up... of a run are those it started with."""
    differences = config_differences(state["config"], config, MODEL_KEYS)
    if differences:
        raise UserError(f"{source}: cannot resume: the checkpoint's model does not fit the config: "
                        + "; ".join(differences))
    differences = config_differences(state["config"], config, SCHEDULE_KEYS)
    if state.get("steps", steps) != steps:
        differences.insert(0, f"{steps_key} ({state['steps']} in the run, {steps} in the config)")
    if differences:
        raise UserError(f"{source}: cannot resume: a run keeps the schedule it started with, and the config changes "
                        f"{'; '.join(differences)}; resume with the run's values, or train into a new --out folder")


def info_to_dict(info: DatasetInfo) -> dict[str, Any]:
    """The dataset facts as plain data, so a checkpoint can rebuild its tasks without the dataset."""
    data = asdict(info)
    data["tasks"] = list(info.tasks)
    return data


def info_from_dict(data: dict[str, Any], source: str | Path = "checkpoint") -> DatasetInfo:
    try:
        return DatasetInfo(**{**data, "tasks": tuple(data["tasks"])})
    except (TypeError, KeyError) as err:
        raise UserError(f"{source}: the 'info' entry is not a dataset description ({err})") from None


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

    state = load_checkpoint(path)
    config = from_dict(state["config"], source=f"{path} (saved config)")
    return model_from_state(state, config, path, device)


def model_from_state(
    state: dict[str, Any], config: Config, path: str | Path, device: torch.device | str = "cpu"
) -> LoadedModel:
    """Build ``config``'s model and load a loaded checkpoint's weights into it (EMA weights when present)."""
    from densemtl.models import build_model
    from densemtl.tasks import build_tasks

    files = state.get("files", {})  # an exported folder names the file of each entry
    info = info_from_dict(state["info"], files.get("info", path))
    tasks = build_tasks(config.data.tasks, info, config.loss.normals_loss)
    model = build_model(config, info, tasks)
    weights = state["ema"]["model"] if state.get("ema") else state["model"]
    source = files.get("model", path)
    bad = nonfinite_tensors(weights)
    if bad:
        raise UserError(f"{source}: {len(bad)} weight tensor(s) hold NaN or infinite values (first: {bad[0]}); "
                        "this model cannot predict")
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        raise UserError(f"{source}: weights do not fit the config's model ({str(err).splitlines()[0]})") from None
    return LoadedModel(model.to(device).eval(), tasks, config, info, int(state.get("step", 0)))


def checkpoint_config(state: dict[str, Any], data_config: str | Path | None, overrides: list[str] | None) -> Config:
    """The checkpoint's config for evaluation: the full boundary protocol (its own thresholds, not a quicker
    count training may have used), the data section replaced by ``data_config``'s, then ``overrides``."""
    data = dict(state["config"])
    data["eval"] = {**data.get("eval", {}), "boundary_thresholds": None}
    source = "checkpoint config"
    if data_config is not None:
        data["data"] = read_yaml(data_config).get("data", {})
        source += f" + data of {data_config}"
    if overrides:
        data = merge_dicts(data, parse_overrides(overrides))
        source += " + overrides"
    return from_dict(data, source)
