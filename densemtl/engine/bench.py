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
from dataclasses import dataclass
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
from densemtl.models.architecture import ReportsCost
from densemtl.registry import ARCHITECTURES, DATASETS
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


def model_cost(config: Config, size: tuple[int, int]) -> dict[str, float]:
    """Total parameters and GFLOPs of one ``size`` image of the config's model, built without data."""
    info = dataset_info(config)
    tasks = build_tasks(list(config.data.tasks), info, config.loss.normals_loss)
    return deployed_cost(build_model(config, info, tasks).eval(), list(tasks), size)


def deployed_cost(model: nn.Module, tasks: list[str], size: tuple[int, int]) -> dict[str, float]:
    """Parameters and GFLOPs per image of a model as it runs: a deployed form that counts its own cost
    (:class:`~densemtl.models.architecture.ReportsCost`) says it for the images it has run so far; any other
    model is counted on one ``size`` image."""
    parameters = count_parameters(model, tasks)["total"]
    cost = model.cost_report() if isinstance(model, ReportsCost) else None
    if cost is not None and cost.gflops_per_image is not None:
        return {"parameters": parameters, "gflops": cost.gflops_per_image}
    image = torch.randn(1, 3, *size, device=next(model.parameters()).device)
    return {"parameters": parameters, "gflops": count_gflops(model, image, tasks)["total"]}


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


@dataclass
class BenchModel:
    """What is measured: the model (or its deployed form), its tasks, the input size and, for a deployed form
    whose cost depends on the images, the images it ran to count that cost (the timing uses them too)."""

    config: Config
    model: nn.Module
    tasks: list[str]
    size: tuple[int, int]
    images: torch.Tensor | None = None
    source: str = "config"


def config_model(config: Config) -> BenchModel:
    """The config's model with random weights, built from the dataset's facts (no data is read)."""
    info = dataset_info(config)
    tasks = build_tasks(list(config.data.tasks), info, config.loss.normals_loss)
    return BenchModel(config, build_model(config, info, tasks).eval(), list(tasks), bench_size(config))


def checkpoint_model(checkpoint: Path, overrides: list[str] | None, images: int) -> BenchModel:
    """A checkpoint's model as deployed (a computation-sharing one: sparse sub-tasks at its
    ``sharing.threshold``). A deployed form that counts its own cost runs the first ``images`` images of the
    validation split first: that cost depends on the images."""
    from densemtl.data import build_dataset
    from densemtl.engine.checkpoint import checkpoint_config, load_checkpoint, model_from_state

    if images < 1:
        raise UserError(f"--images must be at least 1, got {images}")
    state = load_checkpoint(checkpoint)
    config = checkpoint_config(state, None, overrides)
    loaded = model_from_state(state, config, checkpoint)
    model = ARCHITECTURES.lookup(config.model.arch).deployed(loaded.model, config)
    measured = BenchModel(config, model, list(loaded.tasks), bench_size(config), source=str(checkpoint))
    if isinstance(model, ReportsCost):
        dataset = build_dataset(config.data, config.data.val_split, train=False)
        measured.images = torch.stack([dataset[index]["image"] for index in range(min(images, len(dataset)))])
        measured.size = tuple(measured.images.shape[-2:])
        with torch.no_grad():
            for image in measured.images:
                model(image[None])
    return measured


def measure_cost(measured: BenchModel) -> tuple[dict[str, Any], dict[str, Any]]:
    """Parameters and GFLOPs split into parts; a deployed form counting its own cost gives only its total."""
    parameters = count_parameters(measured.model, measured.tasks)
    cost = measured.model.cost_report() if isinstance(measured.model, ReportsCost) else None
    if cost is not None and cost.gflops_per_image is not None:
        return parameters, {"total": cost.gflops_per_image, "counted_by": cost.key}
    return parameters, count_gflops(measured.model, torch.randn(1, 3, *measured.size), measured.tasks)


def run_bench(
    config: Config | None, out: Path | None, repeats: int, checkpoint: Path | None = None,
    overrides: list[str] | None = None, images: int = 8,
) -> dict[str, Any]:
    """Measure the config's model (or ``checkpoint``'s, as deployed): parameters and GFLOPs printed first, then
    latency and throughput; the figures go as JSON to ``out`` (default ``<out_dir>/bench.json``)."""
    if repeats <= 0:
        raise UserError(f"--repeats must be positive, got {repeats}")
    measured = checkpoint_model(checkpoint, overrides, images) if checkpoint is not None else config_model(config)
    config = measured.config
    parameters, gflops = measure_cost(measured)
    height, width = measured.size
    device = resolve_device(config.train.device, env_info())
    result = {
        "name": config.name, "source": measured.source, "arch": config.model.arch,
        "backbone": config.model.backbone, "dataset": config.data.dataset, "input_size": [height, width],
        "device": str(device), "parameters": parameters, "gflops": gflops,
    }
    print(format_cost(result), flush=True)
    model = measured.model.to(device)
    batch = config.data.eval_batch_size
    inputs = measured.images if measured.images is not None else torch.randn(batch, 3, height, width)
    inputs = inputs.repeat((batch + len(inputs) - 1) // len(inputs), 1, 1, 1)[:batch].to(device)
    latency = time_forward(model, inputs[:1], repeats, "latency")
    batch_time = time_forward(model, inputs, repeats, "throughput")
    result.update({"latency_ms": latency * 1000, "throughput": {"batch": batch, "images_per_s": batch / batch_time},
                   "repeats": repeats, "torch_threads": torch.get_num_threads()})
    print(format_timing(result))
    print(f"figures written to {write_json(result, out if out is not None else Path(config.out_dir) / 'bench.json')}")
    return result


def format_cost(result: dict[str, Any]) -> str:
    """The parameters and GFLOPs table (parts a deployed form does not split are left out)."""
    params, gflops = result["parameters"], result["gflops"]
    lines = [
        f"{result['arch']} / {result['backbone']} on {result['dataset']} at "
        f"{result['input_size'][0]}x{result['input_size'][1]}, {result['device']} ({result['source']})",
        f"{'part':<14}{'params (M)':>12}{'GFLOPs':>10}",
    ]
    parts = [("total", params["total"], gflops["total"]), ("backbone", params["backbone"], gflops.get("backbone")),
             ("shared", params["shared"], gflops.get("shared"))]
    parts += [("  " + name, params["tasks"][name], gflops.get("tasks", {}).get(name)) for name in params["tasks"]]
    lines += [f"{part:<14}{count / 1e6:>12.3f}{'-' if flops is None else f'{flops:.3f}':>10}"
              for part, count, flops in parts]
    if "counted_by" in gflops:
        lines.append(f"GFLOPs per image as the deployed form ({gflops['counted_by']}) counted them")
    return "\n".join(lines)


def format_timing(result: dict[str, Any]) -> str:
    return (f"latency (batch 1): {result['latency_ms']:.2f} ms\n"
            f"throughput (batch {result['throughput']['batch']}): {result['throughput']['images_per_s']:.1f} images/s")
