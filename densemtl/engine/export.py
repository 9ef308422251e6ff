"""``densemtl export``: a trained checkpoint (or an exported folder) as a self-contained model folder
(:mod:`densemtl.engine.model_folder`) or as an ONNX graph (:mod:`densemtl.engine.onnx_export`).

Both carry the same ``tasks.json`` and ``README.md`` model card; the folder adds ``config.yaml`` and
``model.safetensors`` (what ``densemtl.load``, ``predict`` and ``evaluate`` read), the ONNX format
``model.onnx``. The weights are the EMA weights when the run kept them (the ones it validated).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from densemtl.atomic import atomic_write
from densemtl.config import from_dict
from densemtl.constants import IMAGE_MEAN, IMAGE_STD
from densemtl.engine.bench import bench_size
from densemtl.engine.checkpoint import load_checkpoint, model_from_state
from densemtl.engine.model_folder import (
    CARD_FILE,
    CONFIG_FILE,
    TASKS_FILE,
    WEIGHTS_FILE,
    describe_tasks,
    exported_config,
    model_card,
    write_model_folder,
)
from densemtl.errors import UserError

ONNX_FILE = "model.onnx"
ONNX_USAGE = (
    "import numpy as np, onnxruntime",
    f'session = onnxruntime.InferenceSession("THIS_FOLDER/{ONNX_FILE}")',
    f"mean, std = np.array({list(IMAGE_MEAN)}), np.array({list(IMAGE_STD)})  # tasks.json: input",
    "image = ((rgb / 255 - mean) / std).transpose(2, 0, 1)[None].astype(np.float32)  # rgb: H x W x 3 uint8",
    'outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"image": image})))',
)
FORMATS = {"folder": (CONFIG_FILE, WEIGHTS_FILE, TASKS_FILE, CARD_FILE), "onnx": (ONNX_FILE, TASKS_FILE, CARD_FILE)}


def training_record(checkpoint: Path, state: dict[str, Any]) -> dict[str, Any]:
    """The step, which weights, and the run's ``results.json`` (beside ``checkpoints/``) when there is one."""
    if "exported" in state:  # re-exporting a folder keeps what its first export recorded
        return {"step": state["step"], **state["exported"]}
    results = None
    results_file = checkpoint.parent.parent / "results.json"
    if checkpoint.parent.name == "checkpoints" and results_file.is_file():
        try:
            results = json.loads(results_file.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise UserError(f"{results_file}: cannot be read ({err})") from None
        results = {key: results.get(key) for key in ("results", "step", "best")}
    return {"step": int(state.get("step", 0)), "weights": "EMA" if state.get("ema") else "trained", "results": results}


def _prepare_out(out: Path, names: tuple[str, ...]) -> None:
    """``out`` as a folder holding nothing but an earlier export's files (which are replaced)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder")
    if out.is_dir():
        others = sorted(p.name for p in out.iterdir() if p.name not in names and not p.name.startswith("."))
        if others:
            raise UserError(f"{out}: holds other files ({', '.join(others[:3])}); choose a new or empty folder")
    out.mkdir(parents=True, exist_ok=True)


def export_model(checkpoint: Path, out: Path, fmt: str = "folder") -> Path:
    """Write ``checkpoint``'s model to ``out`` in ``fmt`` (``folder`` or ``onnx``); returns ``out``."""
    if fmt not in FORMATS:
        raise UserError(f"unknown export format '{fmt}' (known: {', '.join(FORMATS)})")
    checkpoint, out = Path(checkpoint), Path(out)
    state = load_checkpoint(checkpoint)
    config = from_dict(state["config"], source=f"{checkpoint} (saved config)")
    loaded = model_from_state(state, config, checkpoint)
    training = training_record(checkpoint, state)
    description = describe_tasks(config, loaded.info, loaded.tasks)
    _prepare_out(out, FORMATS[fmt])
    if fmt == "folder":
        card = model_card(config, description, training)
        exported = exported_config(config, bench_size(config))
        write_model_folder(out, exported, description, loaded.model.state_dict(), training, card)
    else:
        from densemtl.engine.onnx_export import OPSET, export_onnx

        metadata = export_onnx(loaded, out / ONNX_FILE, description)
        note = (f"This folder holds the ONNX graph `{ONNX_FILE}` (opset {OPSET}; input `image`, one output per "
                f"task; exported form: {metadata['exported_form']}).")
        write_beside_graph(out, description, model_card(config, description, training, ONNX_USAGE, note))
    print(f"exported {checkpoint} ({config.model.arch}, {', '.join(loaded.tasks)}) as {fmt} to {out}")
    return out


def write_beside_graph(out: Path, description: dict[str, Any], card: str) -> None:
    """The ``tasks.json`` and model card that go beside an ONNX graph."""
    for name, text in ((TASKS_FILE, json.dumps(description, indent=2) + "\n"), (CARD_FILE, card)):
        with atomic_write(out / name) as stream:
            stream.write(text.encode())
