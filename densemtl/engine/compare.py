"""``densemtl compare``: one table of runs, seeds grouped, with Delta-m against named single-task baselines.

Inputs are run directories or result files (``results.json`` of a run, ``densemtl evaluate --out``).
A run directory stands for ``evaluation_<split>.json`` (what ``evaluate --checkpoint`` writes beside the
run) when ``--split`` is given and that file exists, else for its ``results.json`` (the validation split).

Every result file records its protocol (:func:`densemtl.engine.results.protocol_record`: dataset, image size,
split, each task's metric settings); results whose records differ are never put side by side. Runs whose
configs differ only in the seed (and in names, folders, devices, evaluation settings) form one group:
figures are the mean and the sample standard deviation over its seeds. Delta-m and the per-task relative
change come from :mod:`densemtl.metrics.delta_m`, per seed, against the baselines' mean over their seeds.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from densemtl.config import Config, EvalConfig, from_dict
from densemtl.engine.bench import model_cost
from densemtl.engine.results import protocol_record
from densemtl.errors import DataError, UserError
from densemtl.metrics.delta_m import Results, delta_m, read_result_file, relative_change
from densemtl.registry import ARCHITECTURES, DATASETS, TASKS

# config keys that do not change what a run learns: runs differing only there (and in the seed) are seeds
NOT_THE_RECIPE = ("name", "out_dir", "eval", "train.seed", "train.device", "data.num_workers",
                  "data.eval_batch_size", "data.synthetic.cache_dir", "train.log_every", "train.eval_every",
                  "train.checkpoint_every")


@dataclass
class ResultFile:
    """One result file: its figures, protocol record, config (None when it records none) and cost."""

    path: Path
    results: Results
    protocol: dict[str, Any]
    config: dict[str, Any] | None
    cost: dict[str, float] | None

    @property
    def seed(self) -> int | None:
        return None if self.config is None else self.config["train"]["seed"]


@dataclass
class Group:
    """Result files of one recipe (seeds of one run configuration)."""

    label: str
    files: list[ResultFile] = field(default_factory=list)

    @property
    def tasks(self) -> list[str]:
        return [name for name in TASKS if all(name in member.results for member in self.files)]

    def values(self, task: str, metric: str) -> list[float]:
        return [float(member.results[task][metric]) for member in self.files]


def resolve_input(path: Path, split: str | None) -> Path:
    """The result file a command-line input stands for (a run directory: see the module docstring)."""
    if not path.exists():
        raise UserError(f"{path}: no such run directory or result file")
    if not path.is_dir():
        return path
    candidates = ([path / f"evaluation_{split}.json"] if split else []) + [path / "results.json"]
    found = next((candidate for candidate in candidates if candidate.is_file()), None)
    if found is None:
        hint = f"densemtl evaluate --checkpoint {path / 'checkpoints' / 'best.pt'} --split {split}" if split else (
            "a finished training run")
        raise UserError(f"{path}: holds no {' or '.join(c.name for c in candidates)} (needs {hint})")
    return found


def read_input(path: Path, split: str | None) -> ResultFile:
    """Read one input; its protocol from the file (or, for an older ``results.json``, from its config)."""
    path = resolve_input(path, split)
    data = read_result_file(path)
    config = data.get("config")
    protocol = data.get("protocol")
    if protocol is None and isinstance(config, dict) and "best" in data:  # a run's results.json before records
        parsed = from_dict(config, str(path))
        protocol = protocol_record(parsed, parsed.data.val_split, list(data["results"]))
    if protocol is None:
        raise DataError(f"{path}: records no protocol (dataset, split, metric settings); evaluate again with --out")
    if split is not None and protocol["split"] != split:
        raise UserError(f"{path}: results on split '{protocol['split']}', not '{split}' (the split compared)")
    return ResultFile(path, data["results"], protocol, config, data.get("cost"))


def _drop(config: dict[str, Any], dotted: str) -> None:
    *parents, last = dotted.split(".")
    for key in parents:
        config = config.get(key, {})
    config.pop(last, None)


def recipe_key(result: ResultFile) -> str:
    """What identifies a result's recipe: its config without the seed and the keys of NOT_THE_RECIPE."""
    if result.config is None:
        return str(result.path)
    config = json.loads(json.dumps(result.config))
    for dotted in NOT_THE_RECIPE:
        _drop(config, dotted)
    return json.dumps(config, sort_keys=True)


def group_seeds(results: Sequence[ResultFile]) -> list[Group]:
    """Group results by recipe, in the order first seen; two results of one recipe and seed are refused."""
    groups: dict[str, Group] = {}
    for result in results:
        key = recipe_key(result)
        if key not in groups:
            label = _label(result)
            if any(group.label == label for group in groups.values()):
                label = f"{label} ({result.path.parent.name or result.path.stem})"
            groups[key] = Group(label)
        group = groups[key]
        twin = next((m for m in group.files if m.seed == result.seed and result.seed is not None), None)
        if twin is not None:
            raise UserError(f"{result.path} and {twin.path}: the same recipe and seed {result.seed} given twice")
        group.files.append(result)
    return list(groups.values())


def _label(result: ResultFile) -> str:
    return str(result.config["name"]) if result.config is not None else result.path.stem


def check_comparable(results: Sequence[ResultFile]) -> None:
    """Refuse (one line) results from different datasets, image sizes, splits or metric settings."""
    first = results[0]
    for other in results[1:]:
        for key in ("dataset", "image_size", "split"):
            if first.protocol[key] != other.protocol[key]:
                raise UserError(f"cannot compare {first.path} and {other.path}: {key} "
                                f"{first.protocol[key]} vs {other.protocol[key]}")
    settings: dict[str, tuple[ResultFile, Any]] = {}
    for result in results:
        for task, values in result.protocol["metrics"].items():
            seen = settings.setdefault(task, (result, values))
            if seen[1] != values:
                raise UserError(f"cannot compare {seen[0].path} and {result.path}: the {task} metric settings "
                                f"differ ({_difference(seen[1], values)})")


def _difference(first: dict[str, Any], second: dict[str, Any]) -> str:
    keys = [key for key in sorted(set(first) | set(second)) if first.get(key) != second.get(key)]
    return ", ".join(f"{key} {first.get(key)} vs {second.get(key)}" for key in keys)


def baseline_figures(groups: Sequence[Group], eval_config: EvalConfig) -> tuple[Results, dict[str, str]]:
    """Each task's Delta-m metric averaged over the seeds of the one baseline group that holds it, and which
    group that is; a task held by two baseline groups is refused."""
    figures: Results = {}
    sources: dict[str, str] = {}
    for group in groups:
        for task in group.tasks:
            if task in sources:
                raise UserError(f"task '{task}' has two baselines: {sources[task]} and {group.label}; name one")
            metric = TASKS[task].delta_m_metric(eval_config)
            if metric not in group.files[0].results[task]:
                raise DataError(f"{group.files[0].path}: baseline has no '{metric}' for task '{task}'")
            figures[task] = {metric: float(np.mean(group.values(task, metric)))}
            sources[task] = group.label
    return figures, sources


def _mean_std(values: Sequence[float]) -> dict[str, float]:
    """Mean and sample standard deviation (0 for one value)."""
    return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
            "n": len(values)}


@dataclass
class Comparison:
    """The rows of the table (one per group) and the columns they fill."""

    tasks: list[str]
    metrics: dict[str, str]  # task -> the metric shown (the one Delta-m compares)
    rows: list[dict[str, Any]]
    baselines: dict[str, str]  # task -> baseline group label
    protocol: dict[str, Any]


def _row(group: Group, metrics: dict[str, str], baselines: Results | None, eval_config: EvalConfig) -> dict[str, Any]:
    tasks = group.tasks
    row: dict[str, Any] = {
        "run": group.label,
        "seeds": [member.seed for member in group.files],
        "files": [str(member.path) for member in group.files],
        "tasks": {task: _mean_std(group.values(task, metrics[task])) for task in tasks},
        "cost": cost_of(group.files[0]),
    }
    if baselines is not None:
        missing = [task for task in tasks if task not in baselines]
        if missing:
            held = ", ".join(baselines) or "none"
            raise UserError(f"no baseline for task '{missing[0]}' of {group.label} (the baselines hold: {held}); "
                            f"add a run trained on {missing[0]} to --baselines")
        row["delta_m"] = _mean_std([delta_m(m.results, baselines, tasks, eval_config) for m in group.files])
        row["relative"] = {
            task: _mean_std([100.0 * relative_change(value, baselines[task][metrics[task]],
                                                     TASKS[task].lower_is_better)
                             for value in group.values(task, metrics[task])])
            for task in tasks
        }
    return row


def compare(runs: Sequence[Path], baselines: Sequence[Path] = (), split: str | None = None) -> Comparison:
    """Read, check and group ``runs`` (and ``baselines``); the figures of the table."""
    if not runs:
        raise UserError("compare needs at least one run directory or result file")
    run_files = [read_input(Path(path), split) for path in runs]
    baseline_files = [read_input(Path(path), split) for path in baselines]
    check_comparable(run_files + baseline_files)
    eval_config = _eval_config(run_files[0])
    groups = group_seeds(run_files)
    tasks = [name for name in TASKS if any(name in group.tasks for group in groups)]
    metrics = {task: TASKS[task].delta_m_metric(eval_config) for task in tasks}
    reference, sources = baseline_figures(group_seeds(baseline_files), eval_config) if baselines else (None, {})
    rows = [_row(group, metrics, reference, eval_config) for group in groups]
    return Comparison(tasks, metrics, rows, sources, run_files[0].protocol)


def read_baselines(paths: Sequence[str | Path], split: str) -> list[ResultFile]:
    """The baseline result files of ``eval.baselines`` on ``split`` (read before a model is evaluated)."""
    return [read_input(Path(path), split) for path in paths]


def delta_m_report(results: Results, protocol: dict[str, Any], baselines: Sequence[ResultFile],
                   eval_config: EvalConfig) -> dict[str, Any]:
    """Delta-m (%) of one evaluation and each task's relative change (%) against ``baselines``, refused (one
    line) when they are recorded differently or miss a task."""
    current = ResultFile(Path("this evaluation"), results, protocol, None, None)
    check_comparable([current, *baselines])
    reference, sources = baseline_figures(group_seeds(baselines), eval_config)
    metrics = {task: TASKS[task].delta_m_metric(eval_config) for task in results}
    row = _row(Group("this evaluation", [current]), metrics, reference, eval_config)
    return {"delta_m": row["delta_m"]["mean"], "relative": {task: v["mean"] for task, v in row["relative"].items()},
            "baselines": sources}


def format_delta_m(report: dict[str, Any]) -> str:
    changes = ", ".join(f"{task} {change:+.2f}" for task, change in report["relative"].items())
    return f"Delta-m vs eval.baselines: {report['delta_m']:+.2f} % ({changes})"


def _eval_config(result: ResultFile) -> EvalConfig:
    """The evaluation settings Delta-m follows (saliency's metric): the first run's."""
    if result.config is None:
        return EvalConfig()
    return from_dict(result.config, str(result.path)).eval


def cost_of(result: ResultFile) -> dict[str, float] | None:
    """Parameters and GFLOPs per image: recorded in the file, else counted on the config's model (random
    weights, at the bench size) unless its architecture deploys another form (whose cost needs the weights)."""
    if result.cost is not None:
        return result.cost
    if result.config is None:
        return None
    config = from_dict(result.config, str(result.path))
    if ARCHITECTURES.lookup(config.model.arch).deploy is not None:
        return None
    return _counted_cost(config)


def _counted_cost(config: Config) -> dict[str, float]:
    torch.manual_seed(0)
    return model_cost(config, DATASETS.lookup(config.data.dataset).native_size(config.data))


# --- output -------------------------------------------------------------------------------------------------


def _cell(figure: dict[str, float] | None, digits: int = 2) -> str:
    if figure is None:
        return "-"
    if figure["n"] == 1:
        return f"{figure['mean']:.{digits}f}"
    return f"{figure['mean']:.{digits}f} ± {figure['std']:.{digits}f}"


def table_rows(comparison: Comparison) -> list[list[str]]:
    """The table as text cells, header first."""
    header = ["run", "seeds"] + [f"{task} {comparison.metrics[task]}" for task in comparison.tasks]
    header += ["params (M)", "GFLOPs"]
    with_baselines = bool(comparison.baselines)
    if with_baselines:
        header += ["Δm (%)"] + [f"Δ{task} (%)" for task in comparison.tasks]
    lines = [header]
    for row in comparison.rows:
        cost = row["cost"]
        cells = [row["run"], str(len(row["seeds"]))]
        cells += [_cell(row["tasks"].get(task)) for task in comparison.tasks]
        cells += ["-", "-"] if cost is None else [f"{cost['parameters'] / 1e6:.3f}", f"{cost['gflops']:.3f}"]
        if with_baselines:
            cells += [_cell(row["delta_m"])] + [_cell(row["relative"].get(task)) for task in comparison.tasks]
        lines.append(cells)
    return lines


def format_markdown(comparison: Comparison) -> str:
    rows = table_rows(comparison)
    protocol = comparison.protocol
    lines = [
        f"{protocol['dataset']} {protocol['split']} split, {protocol['image_size'][0]}x{protocol['image_size'][1]}; "
        "mean ± sample std over seeds",
        "| " + " | ".join(rows[0]) + " |",
        "|" + "|".join("---" for _ in rows[0]) + "|",
        *("| " + " | ".join(cells) + " |" for cells in rows[1:]),
    ]
    if comparison.baselines:
        held = ", ".join(f"{task}: {label}" for task, label in comparison.baselines.items())
        lines.append(f"Delta-m against the baselines {held}")
    return "\n".join(lines)


def format_csv(comparison: Comparison) -> str:
    stream = io.StringIO()
    csv.writer(stream, lineterminator="\n").writerows(table_rows(comparison))
    return stream.getvalue()


def comparison_json(comparison: Comparison) -> dict[str, Any]:
    return {"protocol": comparison.protocol, "metrics": comparison.metrics, "baselines": comparison.baselines,
            "rows": comparison.rows}


RENDERERS = {".md": format_markdown, ".csv": format_csv,
             ".json": lambda comparison: json.dumps(comparison_json(comparison), indent=2)}


def _renderer(out: Path) -> Any:
    if out.suffix not in RENDERERS:
        raise UserError(f"{out}: --out must end in {', '.join(RENDERERS)}")
    return RENDERERS[out.suffix]


def run_compare(runs: Sequence[Path], baselines: Sequence[Path] = (), split: str | None = None,
                out: Path | None = None) -> Comparison:
    """``densemtl compare``: print the Markdown table; write it (Markdown, CSV or JSON by suffix) to ``out``."""
    render = _renderer(out) if out is not None else None
    comparison = compare(runs, baselines, split)
    print(format_markdown(comparison))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(render(comparison).rstrip("\n") + "\n")
        print(f"comparison written to {out}")
    return comparison
