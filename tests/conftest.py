"""Helpers shared by several test modules (tiny configs and trainers, a tiny sharing model, geometry checks).

Test modules import them from here (``from tests.conftest import tiny_config``) instead of from each other.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

# Every densemtl import of the helpers, in one place.
from densemtl.config import Config, load_config
from densemtl.data import build_dataset
from densemtl.data.synthetic import FOCAL_AT_640, synthetic_info
from densemtl.engine.distributed import DistInfo
from densemtl.engine.objective import build_objective
from densemtl.engine.trainer import Trainer
from densemtl.models import build_model
from densemtl.models.sharing.model import SharingModel
from densemtl.tasks import Task, build_tasks

# --- GPU tests ------------------------------------------------------------------------------------


def cuda_gpus_needed(item: pytest.Item) -> int:
    """How many GPUs a test marked ``cuda`` (``cuda(gpus=N)``) needs; 0 for other tests."""
    marker = item.get_closest_marker("cuda")
    return 0 if marker is None else int(marker.kwargs.get("gpus", 1))


def gpus_available() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip the ``cuda`` tests a machine has too few GPUs for, saying so."""
    for item in items:
        needed = cuda_gpus_needed(item)
        if needed > gpus_available():
            item.add_marker(pytest.mark.skip(reason=f"needs {needed} CUDA GPU(s), this machine has {gpus_available()}"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Any:
    """A ``cuda`` test skipped on a machine with the GPUs it needs fails instead: a GPU run never passes by
    skipping its GPU tests."""
    outcome = yield
    report = outcome.get_result()
    needed = cuda_gpus_needed(item)
    if report.skipped and needed and gpus_available() >= needed:
        report.outcome = "failed"
        report.longrepr = f"a cuda test was skipped on a machine with {gpus_available()} GPU(s): {report.longrepr}"


# --- training runs ----------------------------------------------------------------------------------


def tiny_config(tmp_path: Path, *overrides: str) -> Config:
    """A config small enough for a unit test: 32x48 synthetic frames, the CPU backbone, batch 4."""
    base = [
        "data.synthetic.height=32", "data.synthetic.width=48", "data.synthetic.num_train=12",
        "data.synthetic.num_val=4", "data.synthetic.num_test=2", f"data.synthetic.cache_dir={tmp_path / 'cache'}",
        "data.tasks=[semseg,depth,normals,edge]", "data.batch_size=4", "model.backbone=resnet-tiny",
        "model.neck_channels=16", "model.head_channels=16", "train.device=cpu", "train.steps=6",
        "train.warmup_steps=2", "train.log_every=1", "train.eval_every=1000", "train.checkpoint_every=1000",
        f"out_dir={tmp_path / 'run'}",
    ]
    return load_config(None, base + list(overrides))


def make_trainer(
    config: Config, run_dir: Path | None = None, model_class: type[nn.Module] | None = None, **kwargs: Any
) -> Trainer:
    """A CPU trainer for ``config`` on its synthetic data (seeded like run_training); one process unless
    ``dist_info`` is given. ``model_class(tasks)`` replaces the config's model."""
    torch.manual_seed(config.train.seed)
    train_set = build_dataset(config.data, "train", train=True)
    tasks = build_tasks(config.data.tasks, train_set.info, config.loss.normals_loss)
    model = model_class(tasks) if model_class else build_model(config, train_set.info, tasks)
    objective = build_objective(config, tasks, model.feature_channels)
    kwargs.setdefault("dist_info", DistInfo())
    kwargs.setdefault("device", torch.device("cpu"))
    return Trainer(config, model, objective, train_set, run_dir or Path(config.out_dir), info=train_set.info, **kwargs)


def read_log(run_dir: Path, kind: str = "train") -> list[dict[str, Any]]:
    lines = (run_dir / "log.jsonl").read_text().splitlines()
    return [record for record in map(json.loads, lines) if record["kind"] == kind]


def logged_step(run_dir: Path) -> int:
    """The last training step of ``log.jsonl`` (its complete lines; 0 when there is none yet)."""
    try:
        text = (run_dir / "log.jsonl").read_text()
    except OSError:
        return 0
    lines = text.split("\n")[:-1]  # the last piece is empty or a line still being written
    return max((record["step"] for record in map(json.loads, lines) if record["kind"] == "train"), default=0)


REPO = Path(__file__).resolve().parents[1]


def densemtl_process(*args: str, launcher: tuple[str, ...] = ("-m", "densemtl.cli")) -> subprocess.Popen:
    """``python -m densemtl.cli ARGS`` (or another ``launcher``) on this checkout's package, with as many threads
    as this process, in a process group of its own; its output goes to ``<first --out>.stderr`` when there is
    an ``--out``, else nowhere."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": str(torch.get_num_threads())}  # the arithmetic of this process
    out = args[args.index("--out") + 1] if "--out" in args else None
    with open(f"{out}.stderr" if out else os.devnull, "ab") as log:
        return subprocess.Popen([sys.executable, *launcher, *args], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                stderr=log, start_new_session=True)


def kill_when(process: subprocess.Popen, ready: Callable[[], bool], timeout: float = 300.0) -> None:
    """SIGKILL ``process`` and its group as soon as ``ready()`` (polled every 10 ms) or it has ended."""
    deadline = time.monotonic() + timeout
    while process.poll() is None and not ready():
        if time.monotonic() > deadline:
            break
        time.sleep(0.01)
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


# --- distributed runs -------------------------------------------------------------------------------


class GroupNormNet(nn.Module):
    """A tiny model following the model contract, normalised with GroupNorm (no batch statistics)."""

    def __init__(self, tasks: dict[str, Task]) -> None:
        super().__init__()
        self.tasks = tasks
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU())
        self.heads = nn.ModuleDict({name: nn.Conv2d(8, task.channels, 1) for name, task in tasks.items()})
        self.feature_channels = {name: 8 for name in tasks}

    def forward(self, image: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
        feature = self.body(image)
        pred = {name: head(feature) for name, head in self.heads.items()}
        return {"pred": pred, "features": dict.fromkeys(self.tasks, feature)}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- backbones ------------------------------------------------------------------------------------

# Each backbone family at a size a unit test builds in a moment.
TINY_ARGS = {
    "resnet": {"embedding_size": 8, "hidden_sizes": [8, 16, 24, 32], "depths": [1, 1, 1, 1], "layer_type": "basic"},
    "convnext": {"hidden_sizes": [8, 16, 24, 32], "depths": [1, 1, 1, 1]},
    "swin": {"embed_dim": 8, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 2, 2], "window_size": 4},
    "mobilenetv2": {"depth_multiplier": 0.25},
    "segformer": {"hidden_sizes": [8, 16, 24, 32], "depths": [1, 1, 1, 1], "num_attention_heads": [1, 1, 2, 2]},
    "vit": {"hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 2, "intermediate_size": 64},
    "dinov2": {"hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 2, "image_size": 56},
}

# --- computation sharing ----------------------------------------------------------------------------

TINY = [
    "model.arch=sharing",
    "data.tasks=[semseg,depth,edge]",
    "model.backbone_args={hidden_size: 24, num_hidden_layers: 2, num_attention_heads: 2, intermediate_size: 48,"
    " patch_size: 8}",
    "model.head_channels=8",
    "data.synthetic.height=32",
    "data.synthetic.width=48",
]


def tiny_model(overrides: list[str] | None = None, trained: bool = True) -> SharingModel:
    """A tiny sharing model; ``trained`` fakes phase 1 (random deltas, about 7% of the gates open)."""
    torch.manual_seed(0)
    config = load_config(None, TINY + (overrides or []))
    info = synthetic_info()
    model = build_model(config, info, build_tasks(config.data.tasks, info))
    if trained:
        with torch.no_grad():
            for deltas in model.deltas.values():
                for delta in deltas.values():
                    delta.delta.normal_(0.0, 0.05)
                    delta.gate.raw.copy_((torch.randn_like(delta.gate.raw) * 2.0 - 3.0) / delta.gate.scale)
        model.set_phase(2)
    return model.eval()


# --- geometry of the synthetic scenes ---------------------------------------------------------------


def normals_from_depth(depth: np.ndarray) -> np.ndarray:
    """Camera-frame normals (x right, y up, z to the viewer) of the surface a z-depth map describes,
    by central differences of the back-projected points; 3 x (H-2) x (W-2), facing the camera."""
    height, width = depth.shape
    focal = FOCAL_AT_640 * width / 640
    cols, rows = np.meshgrid(np.arange(width) + 0.5 - width / 2, np.arange(height) + 0.5 - height / 2)
    points = np.stack([cols / focal * depth, -rows / focal * depth, -depth])
    along_x = points[:, 1:-1, 2:] - points[:, 1:-1, :-2]
    along_y = points[:, 2:, 1:-1] - points[:, :-2, 1:-1]
    normals = np.cross(along_x, along_y, axis=0)
    normals /= np.linalg.norm(normals, axis=0, keepdims=True)
    return normals * -np.sign((normals * points[:, 1:-1, 1:-1]).sum(axis=0))


def label_interior(labels: np.ndarray) -> np.ndarray:
    """Pixels (without the 1-pixel border) whose 3 x 3 neighbourhood has one label."""
    height, width = labels.shape
    centre = labels[1:-1, 1:-1]
    same = np.ones(centre.shape, bool)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            same &= labels[1 + dy : height - 1 + dy, 1 + dx : width - 1 + dx] == centre
    return same


def angles_deg(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-pixel angle in degrees between two 3 x H x W unit-vector maps."""
    return np.degrees(np.arccos(np.clip((a * b).sum(axis=0), -1, 1)))
