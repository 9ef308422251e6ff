"""Training an architecture's phases in order, one :class:`~densemtl.engine.trainer.Trainer` each.

An architecture with one phase trains in the run directory itself (``checkpoints/``, ``log.jsonl``,
``results.json`` of its validations). With several phases (:class:`densemtl.models.architecture.Phase`),
phase ``i`` trains in ``<out_dir>/phase<i>_<name>/`` (its own ``checkpoints/last.pt``); with ``resume``,
finished phases are loaded instead of trained and an interrupted phase continues exactly where it stopped.
At the end the last trained phase's checkpoints are copied to ``<out_dir>/checkpoints/`` (what ``predict``
and ``evaluate`` take), and every task is validated in the architecture's deployed form into
``<out_dir>/results.json``; a one-phase architecture with a deployed form is validated the same way.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from densemtl.config import Config
from densemtl.engine.checkpoint import TRAINING_ENTRIES, load_checkpoint
from densemtl.engine.compare import delta_m_report, format_delta_m, read_baselines
from densemtl.engine.objective import build_objective
from densemtl.engine.prepare import RunSetup, build_evaluator, seed_everything
from densemtl.engine.results import format_results, protocol_record, write_results
from densemtl.engine.trainer import Trainer
from densemtl.errors import UserError
from densemtl.metrics.delta_m import Results
from densemtl.models.architecture import Architecture, Phase
from densemtl.tasks import Task


def phase_dir(run_dir: Path, index: int, name: str) -> Path:
    """The run directory of phase ``index`` (called ``name``) of a multi-phase training."""
    return Path(run_dir) / f"phase{index}_{name}"


def _load_finished(folder: Path, phase: Phase, model: nn.Module) -> bool:
    """Load the phase's final weights into ``model`` when ``folder`` already holds all its steps."""
    last = folder / "checkpoints" / "last.pt"
    if not last.exists():
        return False
    state = load_checkpoint(last, TRAINING_ENTRIES)
    if state["step"] < phase.steps:
        return False
    model.load_state_dict(state["model"])
    return True


def train_phases(config: Config, architecture: Architecture, run: RunSetup, resume: bool = False) -> Results:
    """Build the config's model and train its architecture's phases; returns the final results."""
    run_dir = Path(config.out_dir)
    is_main = run.dist_info.is_main
    if is_main and not resume and (run_dir / "checkpoints" / "last.pt").exists():
        print(f"densemtl: starting a fresh run in {run_dir} (use --resume to continue the earlier one)")
    model = architecture.build(config, run.info, run.tasks)
    phases = architecture.phases(config, model)
    several = len(phases) > 1
    trainer, trained_in, results = None, run_dir, {}
    for index, phase in enumerate(phases):
        phase.enter(model)
        if phase.steps == 0:
            continue
        trained_in = phase_dir(run_dir, index, phase.name) if several else run_dir
        if several and resume and _load_finished(trained_in, phase, model):
            if is_main:
                print(f"densemtl: phase {index} ({phase.name}) already finished in {trained_in}")
            continue
        if is_main and several:
            print(f"densemtl: phase {index} ({phase.name}): {phase.steps} steps on {', '.join(phase.tasks)}")
        trainer = _phase_trainer(config, run, model, index, phase, trained_in)
        # a phase not started yet starts afresh; a one-phase run asked to resume must have a checkpoint
        results = trainer.fit(resume=resume and (not several or (trained_in / "checkpoints" / "last.pt").exists()))
    best = trainer.best if trainer is not None else {"step": None, "score": None}
    if several or architecture.deploy is not None:
        results = _evaluate_deployed(config, architecture, run, model, sum(phase.steps for phase in phases), best)
        if is_main:
            _copy_checkpoints(trained_in, run_dir)
    if is_main:
        _print_summary(results, run.tasks, run_dir, None if several else best["step"])
        if results and config.eval.baselines:
            print(_delta_m_line(config, results))
    return results or {}


def _delta_m_line(config: Config, results: Results) -> str:
    """Delta-m of the final validation against ``eval.baselines``, or why it cannot be given (the run is done
    by then: a baseline recorded differently is reported, not fatal)."""
    try:
        protocol = protocol_record(config, config.data.val_split, list(results))
        baselines = read_baselines(config.eval.baselines, config.data.val_split)
        return format_delta_m(delta_m_report(results, protocol, baselines, config.eval))
    except UserError as err:
        return f"densemtl: Delta-m not reported: {err}"


def _print_summary(results: Results | None, tasks: dict[str, Task], run_dir: Path, best_step: int | None) -> None:
    """The results table and where the run is (with the best step of a one-phase run)."""
    if results:
        print(format_results(results, tasks))
    print(f"run directory: {run_dir}" + ("" if best_step is None else f" (best step {best_step})"))


def _evaluate_deployed(
    config: Config, architecture: Architecture, run: RunSetup, model: nn.Module, steps: int, best: dict[str, Any]
) -> Results:
    """Every task validated through the architecture's deployed form, written to ``<out_dir>/results.json``."""
    deployed = architecture.deployed(model.to(run.device), config)
    with torch.no_grad():
        results = build_evaluator(config, run.val_set, run.tasks, run.device)(deployed)
    if run.dist_info.is_main:
        write_results(Path(config.out_dir), config, results, steps, best)
    return results


def phase_config(config: Config, phase: Phase) -> Config:
    """``config`` for one phase: ``loss.weights`` of the phase's tasks only (the others do not train there)."""
    weights = {name: weight for name, weight in config.loss.weights.items() if name in phase.tasks}
    return replace(config, loss=replace(config.loss, weights=weights))


def _phase_trainer(config: Config, run: RunSetup, model: nn.Module, index: int, phase: Phase, folder: Path) -> Trainer:
    """The trainer of one phase: its tasks' objective, validation on them, its seed and parameters."""
    tasks = {name: run.tasks[name] for name in phase.tasks}
    channels = {name: model.feature_channels[name] for name in tasks}
    objective = build_objective(phase_config(config, phase), tasks, channels, run.steps_per_epoch(config))
    seed_everything(config.train.seed + 1000 * index + run.dist_info.rank)
    several = folder != Path(config.out_dir)
    return Trainer(
        config, model, objective, run.train_set, folder, info=run.info,
        evaluator=build_evaluator(config, run.val_set, tasks, run.device), sample_set=run.val_set,
        parameters=phase.parameters(model), steps=phase.steps, dist_info=run.dist_info, device=run.device,
        loss_hook=phase.loss_hook, clip_groups=phase.clip_groups(model) if phase.clip_groups else None,
        steps_key=f"the steps of phase {index} ({phase.name})" if several else "train.steps",
    )


def _copy_checkpoints(source: Path, run_dir: Path) -> None:
    """The final phase's ``last.pt`` and ``best.pt`` into ``run_dir/checkpoints`` (nothing when the same)."""
    source, target = source / "checkpoints", run_dir / "checkpoints"
    if source.resolve() == target.resolve():
        return
    target.mkdir(parents=True, exist_ok=True)
    for name in ("last.pt", "best.pt"):
        if (source / name).exists():
            shutil.copyfile(source / name, target / name)
