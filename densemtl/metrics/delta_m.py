"""The multi-task performance delta against single-task baselines.

delta_m = (1/T) sum_t (-1)^{l_t} (M_mt,t - M_st,t) / M_st,t * 100, with l_t = 1 when lower is better
for task t's primary metric (``primary_metric`` / ``lower_is_better`` of the task classes in
:data:`densemtl.registry.TASKS`: mIoU, rmse, mean angle, odsF, maxF). Positive = the multi-task model is
better. :func:`relative_change` is the per-task term, also what the trainer's best-checkpoint score averages.

Saliency enters with maxF by default (``eval.delta_m_saliency``), as the tables of ATRC, InvPT and
TaskPrompter do; ``"mIoU"`` uses Multi-Task-Learning-PyTorch's saliency mIoU instead, for comparisons
with that codebase's delta_m (higher is better for both).

Result files are the JSON the engine writes (``results.json`` of a run, or ``densemtl evaluate --out``):
``{"results": {task: {metric: value, ...}, ...}, ...}``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from densemtl.config import EvalConfig
from densemtl.errors import DataError
from densemtl.registry import TASKS

Results = dict[str, dict[str, float]]  # {task: {metric: value}}: what evaluation returns and result files hold


def relative_change(value: float, reference: float, lower_is_better: bool) -> float:
    """``±(value - reference) / |reference|``, the sign making an improvement positive (a fraction, not %).

    A reference of magnitude below 1e-8 counts as 1e-8, so a metric starting at 0 gives a finite change.
    """
    change = (value - reference) / max(abs(reference), 1e-8)
    return -change if lower_is_better else change


def read_result_file(path: str | Path) -> dict[str, Any]:
    """The whole JSON of one result file, its ``results`` mapping checked; a missing or malformed file is a
    DataError naming it."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: cannot read result file ({err})") from None
    results = data.get("results") if isinstance(data, dict) else None
    if not isinstance(results, dict) or not all(isinstance(v, dict) for v in results.values()):
        raise DataError(f"{path}: expected {{\"results\": {{task: {{metric: value}}}}}}")
    return data


def load_results(path: str | Path) -> Results:
    """The ``results`` mapping of one result file (see :func:`read_result_file`)."""
    return read_result_file(path)["results"]


def load_baselines(paths: Iterable[str | Path]) -> Results:
    """Merge single-task result files into one ``{task: metrics}``; a task found twice is an error."""
    merged: Results = {}
    for path in paths:
        for task, metrics in load_results(path).items():
            if task in merged:
                raise DataError(f"{path}: task '{task}' already has a baseline from another file")
            merged[task] = metrics
    return merged


def delta_m(
    results: Results, baselines: Results, tasks: Iterable[str] | None = None, eval_config: EvalConfig | None = None
) -> float:
    """delta_m in percent over ``tasks`` (default: every task in ``results``); each task compares the metric
    its ``delta_m_metric(eval_config)`` names (the primary one unless the config chooses another)."""
    names = list(tasks) if tasks is not None else list(results)
    if not names:
        raise DataError("delta_m needs at least one task")
    total = 0.0
    for name in names:
        if name not in TASKS:
            raise DataError(f"delta_m: unknown task '{name}' (known: {', '.join(TASKS)})")
        task = TASKS[name]
        metric = task.delta_m_metric(eval_config)
        for label, source in (("results", results), ("baselines", baselines)):
            if metric not in source.get(name, {}):
                raise DataError(f"delta_m: {label} have no '{metric}' for task '{name}'")
        multi, single = float(results[name][metric]), float(baselines[name][metric])
        if single == 0:
            raise DataError(f"delta_m: the baseline '{metric}' of task '{name}' is 0")
        total += relative_change(multi, single, task.lower_is_better)
    return 100.0 * total / len(names)
