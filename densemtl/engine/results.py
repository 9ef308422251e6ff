"""Results of a run (``{task: {metric: value}}``, :data:`densemtl.metrics.delta_m.Results`): the text
table, ``results.json`` and the score that picks the best checkpoint.

The best checkpoint is the one with the highest mean normalised primary metric: for each task,
``±(M_t - R_t) / |R_t|`` (:func:`densemtl.metrics.delta_m.relative_change`) with ``R_t`` the task's primary
metric at the first validation of the run and the sign making higher better; the mean over tasks is the
delta_m of the run against its own start.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from densemtl.config import Config, EvalConfig, to_dict
from densemtl.jsonio import write_json
from densemtl.metrics.delta_m import Results, relative_change
from densemtl.registry import DATASETS
from densemtl.tasks import build_tasks

if TYPE_CHECKING:
    from densemtl.tasks import Task


def primary_score(results: Results, tasks: dict[str, Task], reference: Results) -> float:
    """Mean over tasks of the signed relative change of the primary metric against ``reference``."""
    changes = []
    for name, task in tasks.items():
        metric = task.primary_metric
        if metric not in results.get(name, {}) or metric not in reference.get(name, {}):
            continue
        changes.append(relative_change(results[name][metric], reference[name][metric], task.lower_is_better))
    return float(np.mean(changes)) if changes else 0.0


def format_results(results: Results, tasks: dict[str, Task] | None = None) -> str:
    """A text table, one row per task: the primary metric first, then the others."""
    rows = []
    for name, metrics in results.items():
        primary = tasks[name].primary_metric if tasks and name in tasks else None
        keys = ([primary] if primary in metrics else []) + [k for k in metrics if k != primary]
        cells = "  ".join(f"{k}={metrics[k]:.4f}" for k in keys if isinstance(metrics[k], (int, float)))
        rows.append(f"{name:<12} {cells}")
    width = max((len(row) for row in rows), default=20)
    return "\n".join(["results (one row per task)", "-" * width, *rows])


def protocol_record(config: Config, split: str, task_names: list[str], eval_config: EvalConfig | None = None
                    ) -> dict[str, Any]:
    """What figures depend on besides the model, as result files record it: the dataset, its image size,
    the split and each task's metric settings (``eval_config``, default ``config.eval``).
    ``densemtl compare`` refuses to put side by side results whose records differ."""
    dataset = DATASETS.lookup(config.data.dataset)
    info = dataset.dataset_info(task_names)
    tasks = build_tasks(task_names, info)
    eval_config = eval_config or config.eval
    return {
        "dataset": config.data.dataset,
        "image_size": list(dataset.native_size(config.data)),
        "split": split,
        "metrics": {name: task.build_metric(info, eval_config).settings() for name, task in tasks.items()},
    }


def write_results(run_dir: Path, config: Config, results: Results, step: int, best: dict[str, Any]) -> Path:
    """``results.json``: ``{"config", "protocol", "results": {task: {metric: value}}, "step", "best"}`` of a
    validation on ``data.val_split``, written atomically."""
    payload = {"config": to_dict(config), "protocol": protocol_record(config, config.data.val_split, list(results)),
               "results": results, "step": step, "best": {"step": best["step"], "score": best["score"]}}
    return write_json(payload, run_dir / "results.json")
