"""Model cost: parameters, GFLOPs (per task and in total), latency and throughput on the current device.

Per-task attribution works for any model by module name: a submodule (or parameter) belongs to
task ``t`` when ``t`` is a component of its dotted name (``heads.semseg``, ``decoders.depth.stage1``,
``networks.edge.backbone``); the first task name in the path decides, so ``cfm.semseg.gates.depth``
is semseg's. Everything outside such modules is shared (the backbone, a shared neck, functional code
in a parent's ``forward``). ``backbone`` is counted the same way by its component name. FLOPs are
counted by :class:`torch.utils.flop_counter.FlopCounterMode` on one image at the bench input size
(2 FLOPs per multiply-add; element-wise ops, norms and resampling count as zero), so
``total = shared + sum(tasks)``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from densemtl.dataset_info import DatasetInfo
from densemtl.engine.distributed import env_info, resolve_device, synchronize
from densemtl.errors import UserError
from densemtl.jsonio import write_json
from densemtl.models import build_model
from densemtl.registry import DATASETS
from densemtl.tasks import build_tasks

if TYPE_CHECKING:
    from densemtl.config import Config

WARMUP = 3


def dataset_info(config: Config) -> DatasetInfo:
    """The dataset's facts from its class in DATASETS, without reading its files (a bench needs no data)."""
    return DATASETS.lookup(config.data.dataset).dataset_info(config.data.tasks)


def bench_size(config: Config) -> tuple[int, int]:
    """``data.crop_size`` when set, else the dataset's evaluation size."""
    if config.data.crop_size is not None:
        return (config.data.crop_size[0], config.data.crop_size[1])
    return DATASETS.lookup(config.data.dataset).native_size(config.data)


def split_by_owner(values: dict[str, float], owners: Iterable[str], nested: bool) -> dict[str, float]:
    """Sum ``values`` keyed by dotted names per owner (the first owner name among the components).

    ``nested`` is for module-level counts where a parent includes its children: only the module at
    which the owner's name appears is counted, not its descendants again.
    """
    owners = list(owners)
    totals = dict.fromkeys(owners, 0.0)
    for name, value in values.items():
        parts = name.split(".")
        hits = [i for i, part in enumerate(parts) if part in totals]
        if hits and (not nested or hits[0] == len(parts) - 1):
            totals[parts[hits[0]]] += value
    return totals


def count_parameters(model: nn.Module, tasks: list[str]) -> dict[str, Any]:
    sizes = {name: float(p.numel()) for name, p in model.named_parameters()}
    per_task = split_by_owner(sizes, tasks, nested=False)
    total = sum(sizes.values())
    return {
        "total": int(total),
        "backbone": int(split_by_owner(sizes, ["backbone"], nested=False)["backbone"]),
        "shared": int(total - sum(per_task.values())),
        "tasks": {name: int(value) for name, value in per_task.items()},
    }


def count_gflops(model: nn.Module, image: torch.Tensor, tasks: list[str]) -> dict[str, Any]:
    """GFLOPs of one forward pass, split into shared, backbone and per-task parts by module name."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(image)
    root = type(model).__name__ + "."
    flops = {
        name.removeprefix(root): float(sum(ops.values()))
        for name, ops in counter.get_flop_counts().items()
        if name.startswith(root)
    }
    total = float(counter.get_total_flops())
    per_task = split_by_owner(flops, tasks, nested=True)
    return {
        "total": total / 1e9,
        "backbone": split_by_owner(flops, ["backbone"], nested=True)["backbone"] / 1e9,
        "shared": (total - sum(per_task.values())) / 1e9,
        "tasks": {name: value / 1e9 for name, value in per_task.items()},
    }


def time_forward(model: nn.Module, image: torch.Tensor, repeats: int, label: str) -> float:
    """Median seconds of one forward pass over ``repeats`` runs, after warm-up."""
    times = []
    with torch.inference_mode():
        for _ in range(WARMUP):
            model(image)
        for _ in tqdm(range(repeats), desc=label, leave=False):
            synchronize(image.device)
            start = time.perf_counter()
            model(image)
            synchronize(image.device)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_bench(config: Config, out: Path | None, repeats: int) -> dict[str, Any]:
    """Build the config's model, measure it, print a table and write the figures as JSON.

    The JSON goes to ``out``, or to ``<config.out_dir>/bench.json`` when ``out`` is None.
    """
    if repeats <= 0:
        raise UserError(f"--repeats must be positive, got {repeats}")
    info = dataset_info(config)
    tasks = build_tasks(list(config.data.tasks), info, config.loss.normals_loss)
    model = build_model(config, info, tasks).eval()
    task_names = list(tasks)
    height, width = bench_size(config)
    device = resolve_device(config.train.device, env_info())
    parameters = count_parameters(model, task_names)
    gflops = count_gflops(model, torch.randn(1, 3, height, width), task_names)
    model.to(device)
    latency = time_forward(model, torch.randn(1, 3, height, width, device=device), repeats, "latency")
    batch = config.data.eval_batch_size
    batch_time = time_forward(model, torch.randn(batch, 3, height, width, device=device), repeats, "throughput")
    result = {
        "name": config.name,
        "arch": config.model.arch,
        "backbone": config.model.backbone,
        "dataset": config.data.dataset,
        "input_size": [height, width],
        "device": str(device),
        "parameters": parameters,
        "gflops": gflops,
        "latency_ms": latency * 1000,
        "throughput": {"batch": batch, "images_per_s": batch / batch_time},
        "repeats": repeats,
        "torch_threads": torch.get_num_threads(),
    }
    print(format_table(result))
    write_json(result, out if out is not None else Path(config.out_dir) / "bench.json")
    return result


def format_table(result: dict[str, Any]) -> str:
    params, gflops = result["parameters"], result["gflops"]
    lines = [
        f"{result['arch']} / {result['backbone']} on {result['dataset']} at "
        f"{result['input_size'][0]}x{result['input_size'][1]}, {result['device']}",
        f"{'part':<14}{'params (M)':>12}{'GFLOPs':>10}",
        f"{'total':<14}{params['total'] / 1e6:>12.3f}{gflops['total']:>10.3f}",
        f"{'backbone':<14}{params['backbone'] / 1e6:>12.3f}{gflops['backbone']:>10.3f}",
        f"{'shared':<14}{params['shared'] / 1e6:>12.3f}{gflops['shared']:>10.3f}",
    ]
    lines += [
        f"{'  ' + name:<14}{params['tasks'][name] / 1e6:>12.3f}{gflops['tasks'][name]:>10.3f}"
        for name in params["tasks"]
    ]
    lines.append(f"latency (batch 1): {result['latency_ms']:.2f} ms")
    lines.append(
        f"throughput (batch {result['throughput']['batch']}): {result['throughput']['images_per_s']:.1f} images/s"
    )
    return "\n".join(lines)
