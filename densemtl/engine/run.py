"""``densemtl train``: one training run of the config's architecture, whatever its phases.

The run directory (``out_dir``) must be new, empty, a densemtl run (resumed with ``resume``, or started
afresh: its old checkpoints and results are replaced) or explicitly given up with ``overwrite``: a folder
of other files is never written into by accident.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from densemtl.config import Config, to_dict
from densemtl.engine import distributed
from densemtl.engine.phased import train_phases
from densemtl.engine.prepare import prepare_run
from densemtl.errors import UserError
from densemtl.metrics.delta_m import Results
from densemtl.registry import ARCHITECTURES

RUN_SECTIONS = {"data", "model", "train"}  # what the config.yaml of every run directory holds


def is_run_folder(folder: Path) -> bool:
    """Whether ``folder`` holds a densemtl run: a ``config.yaml`` with the config's sections."""
    try:
        data = yaml.safe_load((folder / "config.yaml").read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    return isinstance(data, dict) and RUN_SECTIONS <= set(data)


def check_run_folder(folder: Path, resume: bool, overwrite: bool) -> None:
    """Refuse (one line) to train into ``folder`` when it is a file, or a folder of other files and neither
    ``resume`` nor ``overwrite`` is set."""
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder}: the run directory (--out) is a file")
    if resume or overwrite or not folder.is_dir() or is_run_folder(folder):
        return
    entries = sorted(path.name for path in folder.iterdir())
    if entries:
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise UserError(
            f"{folder}: not empty and not a densemtl run ({len(entries)} entries: {shown}); choose another --out, "
            "or add --overwrite to write the run into it anyway"
        )


def run_training(config: Config, resume: bool = False, overwrite: bool = False) -> Results:
    """Train the config's model on its data; writes the run directory and returns the final results."""
    architecture = ARCHITECTURES.lookup(config.model.arch)
    run_dir = Path(config.out_dir)
    check_run_folder(run_dir, resume, overwrite)
    try:
        run = prepare_run(config)
        if run.dist_info.is_main:  # marks the folder as a run from the start, whatever the phases
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
        return train_phases(config, architecture, run, resume)
    finally:
        distributed.cleanup()
