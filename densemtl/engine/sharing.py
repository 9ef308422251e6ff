"""The phased training of the computation-sharing method: base -> sub-task deltas -> mask fine-tuning ->
activation sharing, each phase one :class:`densemtl.engine.train.Trainer` run of ``sharing.phase_steps[i]``.

Phase ``i`` trains in ``<out_dir>/phase<i>_<name>/`` (its own ``checkpoints/last.pt``, whose model holds
the ``phase`` buffer). With ``resume``, finished phases are loaded instead of trained and an interrupted
phase continues exactly where it stopped. At the end the last phase's checkpoints are copied to
``<out_dir>/checkpoints/`` (what ``predict``/``evaluate`` take) and every task is validated, by the
token-skipping inference at ``sharing.threshold`` as deployed, into ``<out_dir>/results.json``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from densemtl.config import Config
from densemtl.engine import distributed
from densemtl.engine.checkpoint import load_checkpoint
from densemtl.engine.objective import build_objective
from densemtl.engine.train import (
    Results,
    Trainer,
    build_evaluator,
    format_results,
    prepare_run,
    seed_everything,
    write_results,
)
from densemtl.errors import ConfigError
from densemtl.models.sharing import PHASES, SharedInference, SharingModel


def phase_dir(run_dir: Path, phase: int) -> Path:
    return run_dir / f"phase{phase}_{PHASES[phase]}"


def run_sharing_pipeline(config: Config, resume: bool = False) -> Results:
    """Train the four phases in order (skipping those already finished when resuming); returns the results."""
    from densemtl.models import build_model

    steps = config.sharing.phase_steps
    if len(steps) != len(PHASES) or min(steps) < 0:
        raise ConfigError(f"key 'sharing.phase_steps': expected {len(PHASES)} step counts >= 0 ({', '.join(PHASES)})")
    setup = prepare_run(config)
    dist_info, device, train_set, val_set = setup.dist_info, setup.device, setup.train_set, setup.val_set
    info, tasks = setup.info, setup.tasks
    try:
        run_dir = Path(config.out_dir)
        model = build_model(config, info, tasks)
        if not isinstance(model, SharingModel):
            raise ConfigError("key 'model.arch': the sharing pipeline needs arch 'sharing'")
        trainer = None
        for phase, phase_steps in enumerate(steps):
            model.set_phase(phase)
            if phase_steps == 0:
                continue
            folder = phase_dir(run_dir, phase)
            last = folder / "checkpoints" / "last.pt"
            if resume and last.exists():
                state = load_checkpoint(last)
                if state["step"] >= phase_steps:
                    model.load_state_dict(state["model"])
                    if dist_info.is_main:
                        print(f"densemtl: phase {phase} ({PHASES[phase]}) already finished in {folder}")
                    continue
            phase_tasks = {name: tasks[name] for name in model.trained_tasks()}
            objective = build_objective(
                config, phase_tasks, {n: model.feature_channels[n] for n in phase_tasks},
                setup.steps_per_epoch(config),
            )
            seed_everything(config.train.seed + 1000 * phase + dist_info.rank)
            trainer = Trainer(
                config, model, objective, train_set, folder, info=info,
                evaluator=build_evaluator(config, val_set, phase_tasks, device), sample_set=val_set,
                parameters=[p for p in model.parameters() if p.requires_grad], steps=phase_steps,
                dist_info=dist_info, device=device,
            )
            if dist_info.is_main:
                print(f"densemtl: phase {phase} ({PHASES[phase]}): {phase_steps} steps on {', '.join(phase_tasks)}")
            trainer.fit(resume=resume and last.exists())
        last_phase = max(i for i, n in enumerate(steps) if n > 0)
        inference = SharedInference(model.to(device), config.sharing.threshold)
        with torch.no_grad():
            results = build_evaluator(config, val_set, tasks, device)(inference)
        if dist_info.is_main:
            source = phase_dir(run_dir, last_phase) / "checkpoints"
            (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
            for name in ("last.pt", "best.pt"):
                if (source / name).exists():
                    shutil.copyfile(source / name, run_dir / "checkpoints" / name)
            best = {"step": None, "score": None} if trainer is None else trainer.best
            write_results(run_dir, config, results, sum(steps), best)
            print(format_results(results, tasks))
            print(f"run directory: {run_dir}")
        return results
    finally:
        distributed.cleanup()
