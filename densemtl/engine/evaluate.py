"""Evaluation: a model on a dataset split, a checkpoint, or predictions saved on disk by any codebase.

Every path ends in the same stateful metrics (:mod:`densemtl.metrics`), at the native resolution of
each image (padded batches are cropped back to ``meta["size"]``), with the counts summed across
processes under torch.distributed. A sample without a task's label (partial labels) is left out of that
task's metric. Results are ``{task: {metric: value}}``; the JSON written by
``--out`` is ``{"results": ..., "per_class": {task: {class: IoU}}, "evaluation": {...}}``, which is also
the result-file format :func:`densemtl.metrics.delta_m.load_results` reads.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from densemtl.arrays import all_finite
from densemtl.config import (
    Config,
    DataConfig,
    EvalConfig,
    SyntheticConfig,
    to_dict,
)
from densemtl.data.base import DenseDataset, collate, labelled_mask, loader_options
from densemtl.data.transforms import pad_to
from densemtl.dataset_info import DatasetInfo
from densemtl.engine import distributed
from densemtl.engine.results import format_results, protocol_record
from densemtl.errors import DataError, UserError
from densemtl.jsonio import write_json
from densemtl.metrics.delta_m import Results
from densemtl.models.architecture import ReportsCost
from densemtl.registry import ARCHITECTURES, DATASETS
from densemtl.tasks import TASKS, ClassMapTask, Task, build_tasks


def build_metrics(
    tasks: dict[str, Task], info: DatasetInfo, eval_config: EvalConfig, include_boundary: bool = True
) -> dict[str, Any]:
    """One metric per task; a task whose metric is costly (boundary matching) left out when ``include_boundary``
    is False."""
    return {
        name: task.build_metric(info, eval_config)
        for name, task in tasks.items()
        if include_boundary or not task.costly_metric
    }


def compute_all(metrics: dict[str, Any]) -> Results:
    """Sum the counts over processes, then compute every metric."""
    for metric in metrics.values():
        metric.sync()
    return {name: metric.compute() for name, metric in metrics.items()}


def _padding_collate(tasks: dict[str, Task]) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
    """Collate samples of different sizes by padding them (bottom/right) to the largest one."""
    fills = {name: task.fill_value for name, task in tasks.items()}

    def pad_and_collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
        height = max(sample["image"].shape[-2] for sample in samples)
        width = max(sample["image"].shape[-1] for sample in samples)
        return collate([pad_to(sample, (height, width), fills) for sample in samples])

    return pad_and_collate


def _shard(dataset: Dataset) -> Dataset:
    """This process's share of the split (every sample exactly once over all processes)."""
    if not distributed.is_active():
        return dataset
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    return Subset(dataset, list(range(rank, len(dataset), world)))


def _main_process() -> bool:
    return not distributed.is_active() or torch.distributed.get_rank() == 0


@torch.no_grad()
def run_metrics(
    model: nn.Module,
    dataset: Dataset,
    tasks: dict[str, Task],
    metrics: dict[str, Any],
    config: Config,
    device: torch.device | str,
) -> None:
    """Feed the model's predictions on ``dataset`` (this process's share) into ``metrics``."""
    loader = DataLoader(
        _shard(dataset),
        batch_size=config.data.eval_batch_size,
        shuffle=False,
        collate_fn=_padding_collate(tasks),
        **{**loader_options(config.data, torch.device(device)), "persistent_workers": False},  # one pass each
    )
    device = torch.device(device)
    pending: tuple[dict[str, torch.Tensor], dict[str, Any], torch.cuda.Event | None] | None = None
    for batch in tqdm(loader, desc="evaluate", leave=False, disable=not _main_process()):
        raw = model(batch["image"].to(device, non_blocking=True))["pred"]
        # queue the copies to the host, then score the previous batch on the CPU while the GPU runs this one
        preds = {name: tasks[name].predict(raw[name].float()).to("cpu", non_blocking=True) for name in metrics}
        copied = torch.cuda.Event() if device.type == "cuda" else None
        if copied is not None:
            copied.record()
        if pending is not None:
            _update_metrics(metrics, *pending)
        pending = (preds, batch, copied)
    if pending is not None:
        _update_metrics(metrics, *pending)


def _update_metrics(
    metrics: dict[str, Any], preds: dict[str, torch.Tensor], batch: dict[str, Any], copied: torch.cuda.Event | None
) -> None:
    """Add one batch's predictions (once their copy to the host is done) to ``metrics``, unpadded."""
    if copied is not None:
        copied.synchronize()
    for name, metric in metrics.items():
        pred, target = preds[name], batch[name]
        present = labelled_mask(batch, name)  # samples without this task's label are skipped
        if present is None and all(tuple(meta["size"]) == tuple(target.shape[-2:]) for meta in batch["meta"]):
            metric.update(pred, target)  # nothing padded
            continue
        for index, meta in enumerate(batch["meta"]):
            if present is not None and not present[index]:
                continue
            height, width = meta["size"]
            window = (slice(index, index + 1), Ellipsis, slice(0, height), slice(0, width))
            metric.update(pred[window], target[window])


def evaluate_model(
    model: nn.Module,
    dataset: Dataset,
    tasks: dict[str, Task],
    config: Config,
    device: torch.device | str = "cpu",
    include_boundary: bool | None = None,
) -> Results:
    """Metrics of ``model`` on ``dataset`` (the training loop's validation and ``evaluate_checkpoint``).

    ``include_boundary`` None follows ``config.eval.boundary_during_training``.
    """
    if include_boundary is None:
        include_boundary = config.eval.boundary_during_training
    metrics = build_metrics(tasks, dataset.info, config.eval, include_boundary)
    was_training = model.training
    model.eval()
    try:
        run_metrics(model, dataset, tasks, metrics, config, device)
    finally:
        model.train(was_training)
    return compute_all(metrics)


def default_evaluation_file(checkpoint: Path, split: str) -> Path:
    """Where ``evaluate --checkpoint`` writes its figures without ``--out``: ``evaluation_<split>.json`` in the
    run directory of a checkpoint in ``<run>/checkpoints/``, else beside the checkpoint."""
    folder = checkpoint.parent
    if folder.name == "checkpoints":
        folder = folder.parent
    return folder / f"evaluation_{split}.json"


def _chosen_tasks(tasks: dict[str, Task], chosen: list[str] | None, checkpoint: Path) -> dict[str, Task]:
    if not chosen:
        return tasks
    unknown = [name for name in chosen if name not in tasks]
    if unknown:
        raise UserError(f"{checkpoint}: the model has no task '{unknown[0]}' (its tasks: {', '.join(tasks)})")
    return {name: tasks[name] for name in chosen}


def protocol_header(protocol: dict[str, Any], source: str) -> str:
    """One line saying what is scored and how: dataset, split, size and every metric setting."""
    height, width = protocol["image_size"]
    settings = "; ".join(
        f"{task}: " + ", ".join(f"{key} {value}" for key, value in values.items())
        for task, values in protocol["metrics"].items() if values
    )
    return (f"evaluating {source} on {protocol['dataset']} split '{protocol['split']}' ({height}x{width})"
            + (f"; {settings}" if settings else ""))


def evaluate_checkpoint(
    checkpoint: Path,
    data_config: str | Path | None = None,
    overrides: list[str] | None = None,
    split: str = "val",
    matcher: str | None = None,
    out: Path | None = None,
    per_class: bool = False,
    edge_protocol: str | None = None,
    tasks: list[str] | None = None,
) -> Results:
    """Evaluate a trained checkpoint (its EMA weights when it has them) on ``split``; prints a table and writes
    every figure to ``out`` (default: :func:`default_evaluation_file`).

    Boundaries are scored with the edge protocol's full threshold set unless ``overrides`` set
    ``eval.boundary_thresholds``. ``tasks`` scores only those of the model's tasks. The model is scored in its
    architecture's deployed form (a computation-sharing model: sub-tasks by token-skipping inference at
    ``sharing.threshold``; ``sharing.threshold=0`` in ``overrides`` gives the dense sub-task networks); a
    deployed form that counts its cost adds it to the report.
    """
    from densemtl.data import build_dataset
    from densemtl.engine.bench import deployed_cost
    from densemtl.engine.checkpoint import checkpoint_config, load_checkpoint, model_from_state
    from densemtl.engine.compare import delta_m_report, format_delta_m, read_baselines

    state = load_checkpoint(checkpoint)
    config = checkpoint_config(state, data_config, overrides)
    config.eval = _eval_options(config.eval, matcher, edge_protocol)
    dist_info, device = distributed.setup(config.train.device)
    loaded = model_from_state(state, config, checkpoint, device)
    model, info = loaded.model, loaded.info
    scored = _chosen_tasks(loaded.tasks, tasks, checkpoint)
    dataset = build_dataset(replace(config.data, tasks=list(scored)), split, train=False)
    protocol = protocol_record(config, split, list(scored))
    baselines = read_baselines(config.eval.baselines, split)  # a bad file fails before the model runs
    if dist_info.is_main:
        print(protocol_header(protocol, str(checkpoint)))
    source: dict[str, Any] = {"checkpoint": str(checkpoint), "split": split}
    model = ARCHITECTURES.lookup(config.model.arch).deployed(model, config)
    metrics = build_metrics(scored, info, config.eval)
    run_metrics(model, dataset, scored, metrics, config, device)
    results = compute_all(metrics)
    cost = model.cost_report() if isinstance(model, ReportsCost) else None
    if cost is not None:
        source[cost.key] = cost.figures
    if dist_info.is_main:
        if cost is not None:
            print(cost.summary)
        records = {"config": to_dict(config), "protocol": protocol,
                   "cost": deployed_cost(model, list(loaded.tasks), DATASETS.lookup(config.data.dataset).native_size(
                       config.data))}
        if baselines:
            records["delta_m"] = delta_m_report(results, protocol, baselines, config.eval)
            print(format_delta_m(records["delta_m"]))
        out = out if out is not None else default_evaluation_file(checkpoint, split)
        report(results, metrics, scored, config.eval, out, per_class, source, records)
    return results


def report(
    results: Results,
    metrics: dict[str, Any],
    tasks: dict[str, Task],
    eval_config: EvalConfig,
    out: Path | None,
    per_class: bool,
    source: dict[str, Any],
    records: dict[str, Any] | None = None,
) -> None:
    """Print the table (and per-class tables on request); write the JSON of every figure to ``out``, with
    ``records`` (config, protocol, cost) beside them."""
    print(format_results(results, tasks))
    class_tables = {name: metric for name, metric in metrics.items() if hasattr(metric, "per_class_iou")}
    if per_class:
        for name, metric in class_tables.items():
            print(f"\n{name} per class\n{metric.table()}")
    if out is None:
        return
    payload = {
        "results": results,
        "per_class": {
            name: {
                cls: (None if np.isnan(iou) else float(iou))
                for cls, iou in zip(metric.class_names, metric.per_class_iou(), strict=True)
            }
            for name, metric in class_tables.items()
        },
        "evaluation": {**source, "eval": to_dict(eval_config)},
        **(records or {}),
    }
    print(f"figures written to {write_json(payload, out)}")


def _check_prediction(task: Task, path: Path, pred: torch.Tensor, target: torch.Tensor) -> str | None:
    """What is wrong with one loaded prediction (None when it can be scored)."""
    expected = tuple(target.shape[-2:])
    if tuple(pred.shape[-2:]) != expected:
        return f"{path}: prediction size {tuple(pred.shape[-2:])}, ground truth {expected} (H, W)"
    if pred.is_floating_point() and not all_finite(pred):  # any task's, class maps read as floats too
        return f"{path}: holds NaN or infinite values ({int((~torch.isfinite(pred)).sum())} of {pred.numel()})"
    if isinstance(task, ClassMapTask):
        bad = pred[(pred < 0) | (pred >= task.num_classes)]
        if bad.numel():
            return f"{path}: label {int(bad.min())} out of range 0..{task.num_classes - 1}"
    return None


def _prediction_tasks(pred_dir: Path, tasks: list[str] | None) -> list[str]:
    if not pred_dir.is_dir():
        raise DataError(f"{pred_dir}: predictions folder not found")
    if tasks:
        unknown = [name for name in tasks if name not in TASKS]
        if unknown:
            raise UserError(f"unknown task '{unknown[0]}' (known: {', '.join(TASKS)})")
        missing = [name for name in tasks if not (pred_dir / name).is_dir()]
        if missing:
            raise DataError(f"{pred_dir / missing[0]}: no sub-folder of '{missing[0]}' predictions")
        return list(tasks)
    found = [name for name in TASKS if (pred_dir / name).is_dir()]
    if not found:
        raise DataError(f"{pred_dir}: no sub-folder named after a task ({', '.join(TASKS)})")
    return found


def _eval_options(eval_config: EvalConfig, matcher: str | None, edge_protocol: str | None) -> EvalConfig:
    """``eval_config`` with the boundary matcher and edge protocol given on the command line, if any."""
    chosen = {"boundary_matcher": matcher, "edge_protocol": edge_protocol}
    return replace(eval_config, **{key: value for key, value in chosen.items() if value is not None})


def available_cores() -> int:
    """The CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class ScoredImages(Dataset):
    """Item i: the metrics' counts of image i alone and the problems with its prediction files.

    Every image is scored by fresh metrics; the caller adds the counts in image order, so the figures do
    not depend on which process scored which image. The metrics are built in the process that uses them.
    """

    def __init__(
        self,
        ground_truth: DenseDataset,
        pred_dir: Path,
        tasks: dict[str, Task],
        info: DatasetInfo,
        eval_config: EvalConfig,
    ) -> None:
        self.ground_truth = ground_truth
        self.pred_dir = pred_dir
        self.tasks = tasks
        self.info = info
        self.eval_config = eval_config
        self.metrics: dict[str, Any] | None = None

    def __len__(self) -> int:
        return len(self.ground_truth)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if self.metrics is None:
            self.metrics = build_metrics(self.tasks, self.info, self.eval_config)
        try:
            sample = self.ground_truth.targets(index)
        except DataError as err:
            return {"counts": {}, "problems": [], "fatal": str(err)}
        counts: dict[str, dict[str, np.ndarray]] = {}
        problems: list[str] = []
        for name, task in self.tasks.items():
            try:
                path = task.find_file(self.pred_dir / name, sample["meta"]["name"])
                pred = task.load(path)
            except DataError as err:
                problem = str(err)
            else:
                problem = _check_prediction(task, path, pred, sample[name])
            if problem is not None:
                problems.append(problem)
                continue
            metric = self.metrics[name]
            metric.reset()
            metric.update(pred[None], sample[name][None])
            # as numpy: a tensor would cross to the parent through a shared-memory file of its own
            counts[name] = {key: value.numpy() for key, value in metric.counts.items()}
        return {"counts": counts, "problems": problems, "fatal": None}


def _unbatched(item: dict[str, Any]) -> dict[str, Any]:
    return item


def score_images(scored: ScoredImages, workers: int) -> Iterator[dict[str, Any]]:
    """The items of ``scored`` in order, computed by ``workers`` processes (1: this one)."""
    if workers == 1:
        yield from (scored[index] for index in range(len(scored)))
        return
    loader = DataLoader(scored, batch_size=None, num_workers=workers, collate_fn=_unbatched, prefetch_factor=4)
    yield from loader


def evaluate_predictions(
    pred_dir: Path,
    dataset: str,
    root: Path | None,
    split: str = "val",
    tasks: list[str] | None = None,
    matcher: str | None = None,
    out: Path | None = None,
    per_class: bool = False,
    report_all: bool = False,
    synthetic: SyntheticConfig | None = None,
    edge_protocol: str | None = None,
    workers: int | None = None,
) -> Results:
    """Score predictions saved on disk (``pred_dir/<task>/<image name>.<ext>``) against a dataset split.

    Formats are those of :meth:`Task.load` (other codebases' too). A missing prediction, a size
    mismatch or a label out of range raises a DataError naming the file; with ``report_all`` every
    such file is listed before failing. ``synthetic`` sets the embedded dataset's parameters. Images are
    spread over ``workers`` processes (default: the cores available); the figures do not depend on it.
    """
    from densemtl.data import build_dataset

    if DATASETS.lookup(dataset).needs_root and root is None:
        raise UserError(f"dataset '{dataset}' needs --root, the folder holding its ground truth")
    workers = available_cores() if workers is None else workers
    if workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")
    pred_dir = Path(pred_dir)
    names = _prediction_tasks(pred_dir, tasks)
    data_config = DataConfig(dataset=dataset, root=str(root) if root is not None else None, tasks=names)
    if synthetic is not None:
        data_config.synthetic = synthetic
    ground_truth = build_dataset(data_config, split, train=False)
    task_objects = build_tasks(names, ground_truth.info)
    eval_config = _eval_options(EvalConfig(), matcher, edge_protocol)
    metrics = build_metrics(task_objects, ground_truth.info, eval_config)
    scored = ScoredImages(ground_truth, pred_dir, task_objects, ground_truth.info, eval_config)
    problems: list[str] = []
    items = score_images(scored, min(workers, len(scored)))
    for item in tqdm(items, total=len(scored), desc="evaluate", leave=False):
        if item["fatal"] is not None:
            raise DataError(item["fatal"])
        if item["problems"] and not report_all:
            raise DataError(item["problems"][0])
        problems += item["problems"]
        for name, counts in item["counts"].items():
            for key, value in counts.items():
                metrics[name].add(key, value)
    if problems:
        listing = "\n  ".join(problems)
        raise DataError(f"{len(problems)} bad prediction file(s) in {pred_dir}:\n  {listing}")
    results = compute_all(metrics)
    source = {"predictions": str(pred_dir), "dataset": dataset, "root": str(root), "split": split}
    protocol = protocol_record(Config(data=data_config, eval=eval_config), split, names)
    report(results, metrics, task_objects, eval_config, out, per_class, source, {"protocol": protocol})
    return results
