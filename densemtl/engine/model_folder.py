"""The exported model folder (``densemtl export --format folder``): what another program needs to run a
trained model, in files whose reading never runs code from them (no pickle).

- ``config.yaml``: ``name``, the ``model`` section, ``data.dataset``, ``data.tasks``, ``data.crop_size`` (the
  input size the network was built for) and the methods' ``mtcp`` and ``sharing`` sections; read with
  ``yaml.safe_load``;
- ``model.safetensors``: the weights (the EMA weights when the run kept them); its metadata holds the format
  version, the training step and figures, the weights' checksum (the one checkpoints carry,
  :func:`densemtl.engine.tensor_tree.tensors_digest`) and the SHA-256 of ``config.yaml`` and ``tasks.json``;
- ``tasks.json``: per task its channels, what a prediction is and how files store it, class names and
  colours (:meth:`Task.describe`); the input normalisation; the dataset facts the tasks are built from;
- ``README.md``: the model card (:func:`model_card`), for people; not read back.

:func:`read_model_folder` returns a checkpoint-shaped state (``config``, ``info``, ``model``, ``step``), so
everything that loads a checkpoint (:func:`densemtl.engine.checkpoint.load_checkpoint`) loads a folder; a
missing, truncated or changed file is a :class:`UserError` naming it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
import yaml

from densemtl.atomic import atomic_write
from densemtl.config import Config, from_dict, to_dict
from densemtl.constants import IMAGE_MEAN, IMAGE_STD
from densemtl.dataset_info import DatasetInfo
from densemtl.engine.tensor_tree import tensors_digest
from densemtl.errors import UserError
from densemtl.tasks import Task

CONFIG_FILE = "config.yaml"
WEIGHTS_FILE = "model.safetensors"
TASKS_FILE = "tasks.json"
CARD_FILE = "README.md"
FORMAT = "densemtl-model"
FORMAT_VERSION = "1"
METHOD_SECTIONS = ("mtcp", "sharing")  # settings that shape an architecture's network

INPUT = {
    "colour": "RGB",
    "layout": "N x 3 x H x W float32, any H and W",
    "normalisation": "(v / 255 - mean) / std per channel, for RGB values v in 0..255",
    "mean": list(IMAGE_MEAN),
    "std": list(IMAGE_STD),
}
OUTPUTS = ("one map per task at the input size; Python API (densemtl.load(...).predict): H x W, or H x W x C "
           "for several channels; ONNX graph: N x H x W for class ids, N x C x H x W otherwise")


def exported_config(config: Config, input_size: tuple[int, int]) -> dict[str, Any]:
    """The config sections that rebuild the network: ``model``, the tasks and input size, the methods' sections."""
    full = to_dict(config)
    data = {"dataset": config.data.dataset, "tasks": list(config.data.tasks), "crop_size": list(input_size)}
    return {"name": config.name, "model": full["model"], "data": data, **{name: full[name] for name in METHOD_SECTIONS}}


def describe_tasks(config: Config, info: DatasetInfo, tasks: dict[str, Task]) -> dict[str, Any]:
    """``tasks.json``: the tasks' outputs, the input normalisation and the dataset facts the tasks need."""
    return {
        "format": "densemtl-tasks",
        "format_version": int(FORMAT_VERSION),
        "architecture": config.model.arch,
        "backbone": config.model.backbone,
        "input": INPUT,
        "outputs": OUTPUTS,
        "tasks": [task.describe() for task in tasks.values()],
        "dataset": {**{key: getattr(info, key) for key in ("name", "num_classes", "class_names")},
                    "tasks": list(info.tasks), "boundary_max_dist": info.boundary_max_dist},
    }


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def weights_digest(weights: dict[str, torch.Tensor]) -> str:
    """The weights' checksum in name order (independent of the order safetensors stores them in)."""
    return tensors_digest({name: weights[name] for name in sorted(weights)})


def write_model_folder(
    out: Path,
    config: dict[str, Any],
    description: dict[str, Any],
    weights: dict[str, torch.Tensor],
    training: dict[str, Any],
    card: str,
) -> Path:
    """Write the four files under ``out`` (each atomically); ``training`` is ``{"step", "weights", "results"}``."""
    from safetensors.torch import save

    files = {
        CONFIG_FILE: yaml.safe_dump(config, sort_keys=False).encode(),
        TASKS_FILE: (json.dumps(description, indent=2) + "\n").encode(),
    }
    tensors = {name: tensor.detach().cpu().clone().contiguous() for name, tensor in weights.items()}
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "step": str(int(training["step"])),
        "weights": str(training["weights"]),
        "results": json.dumps(training.get("results")),
        "checksum.weights": weights_digest(tensors),
        **{f"sha256.{name}": _sha256(data) for name, data in files.items()},
    }
    files[WEIGHTS_FILE] = save(tensors, metadata=metadata)
    files[CARD_FILE] = card.encode()
    for name, data in files.items():
        with atomic_write(out / name) as stream:
            stream.write(data)
    return out


def _read_bytes(path: Path) -> bytes:
    if not path.is_file():
        raise UserError(f"{path}: missing from the exported model folder")
    return path.read_bytes()


def _read_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of the weights file; an unreadable or truncated file names it."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    data = _read_bytes(path)
    try:
        weights = load(data)
        header_size = int.from_bytes(data[:8], "little")
        metadata = json.loads(data[8 : 8 + header_size]).get("__metadata__") or {}
    except (SafetensorError, OSError, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{path}: not a readable safetensors file ({reason})") from None
    if metadata.get("format") != FORMAT:
        raise UserError(f"{path}: not the weights of an exported densemtl model (no '{FORMAT}' metadata)")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path}: format version {metadata.get('format_version')!r}, this densemtl reads "
                        f"{FORMAT_VERSION}; export the model again with this version")
    if weights_digest(weights) != metadata.get("checksum.weights"):
        raise UserError(f"{path}: the weights changed since export (their checksum differs from the one recorded)")
    return weights, metadata


def _checked_text(folder: Path, name: str, metadata: dict[str, str]) -> str:
    """A file of the folder whose SHA-256 matches the one the weights file recorded at export."""
    path = folder / name
    data = _read_bytes(path)
    if _sha256(data) != metadata.get(f"sha256.{name}"):
        raise UserError(f"{path}: changed since export (its SHA-256 differs from the one recorded in {WEIGHTS_FILE}); "
                        "export the model again instead of editing it")
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None


def _parse(path: Path, text: str, parser: Any) -> Any:
    try:
        return parser(text)
    except (yaml.YAMLError, json.JSONDecodeError) as err:
        reason = str(err).strip().splitlines()[0]
        raise UserError(f"{path}: cannot be parsed ({reason})") from None


def read_model_folder(folder: str | Path) -> dict[str, Any]:
    """A checkpoint-shaped state (``config``, ``info``, ``model``, ``ema`` None, ``step``; ``exported``: what the
    export recorded) read from an exported folder: safetensors, ``yaml.safe_load`` and JSON only, each file checked."""
    folder = Path(folder)
    if not (folder / WEIGHTS_FILE).is_file():
        raise UserError(f"{folder}: not an exported densemtl model folder (no {WEIGHTS_FILE})")
    weights, metadata = _read_weights(folder / WEIGHTS_FILE)
    config_path, tasks_path = folder / CONFIG_FILE, folder / TASKS_FILE
    config = _parse(config_path, _checked_text(folder, CONFIG_FILE, metadata), yaml.safe_load)
    if not isinstance(config, dict):
        raise UserError(f"{config_path}: expected a mapping of config sections")
    tasks = list(from_dict(config, source=str(config_path)).data.tasks)  # a bad value fails here, naming the file
    description = _parse(tasks_path, _checked_text(folder, TASKS_FILE, metadata), json.loads)
    info = description.get("dataset") if isinstance(description, dict) else None
    if not isinstance(info, dict):
        raise UserError(f"{tasks_path}: no 'dataset' entry (the dataset facts the tasks are built from)")
    names = [entry.get("name") for entry in description.get("tasks", []) if isinstance(entry, dict)]
    if names != tasks:
        raise UserError(f"{tasks_path}: tasks {names} differ from {config_path}'s data.tasks {tasks}")
    return {
        "config": config,
        "info": info,  # checked as it is used (densemtl.engine.checkpoint.info_from_dict), naming tasks.json
        "model": weights,
        "files": {"info": str(tasks_path), "model": str(folder / WEIGHTS_FILE)},
        "ema": None,
        "step": int(metadata.get("step", 0)),
        "exported": {"weights": metadata.get("weights"), "results": json.loads(metadata.get("results") or "null")},
    }


FOLDER_USAGE = (
    "import densemtl",
    'model = densemtl.load("THIS_FOLDER")  # device="cuda" to choose',
    "outputs = model.predict(image)  # image: H x W x 3 uint8 NumPy array or PIL image, any size",
)


def model_card(
    config: Config, description: dict[str, Any], training: dict[str, Any], usage: tuple[str, ...] = FOLDER_USAGE,
    note: str = "",
) -> str:
    """``README.md``: what the model predicts, how to run it (``usage``: Python lines), its training figures."""
    tasks = description["tasks"]
    lines = [
        f"# {config.name}: {config.model.arch} model on {config.data.dataset}",
        "",
        f"A densemtl `{config.model.arch}` network (backbone `{config.model.backbone}`) predicting "
        f"{', '.join(t['name'] for t in tasks)} from one RGB image; {training['weights']} weights after "
        f"{training['step']} training steps.{(' ' + note) if note else ''}",
        "",
        "```python",
        *usage,
        "```",
        "",
        "| task | channels | prediction | file written by `densemtl predict` |",
        "|---|---|---|---|",
        *(f"| {t['name']} | {t['channels']} | {t['prediction']} | {t['file']} |" for t in tasks),
        "",
        f"Input: {INPUT['layout']}, {INPUT['normalisation']}; mean {INPUT['mean']}, std {INPUT['std']}.",
        f"Outputs: {OUTPUTS}.",
        "",
        *_figures(training.get("results")),
    ]
    return "\n".join(lines) + "\n"


def _figures(results: dict[str, Any] | None) -> list[str]:
    """The training run's validation figures (``results.json``) as a table, or a line saying there are none."""
    if not results or not results.get("results"):
        return ["No training figures: the checkpoint's run directory had no results.json."]
    lines = [f"## Validation figures of the training run (step {results.get('step')}; best checkpoint at step "
             f"{(results.get('best') or {}).get('step')})", "", "| task | metric | value |", "|---|---|---|"]
    for task, metrics in results["results"].items():
        lines += [f"| {task} | {name} | {value:.4g} |" for name, value in metrics.items()
                  if isinstance(value, (int, float))]
    return lines
