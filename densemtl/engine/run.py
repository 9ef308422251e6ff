"""``densemtl train``: one training run of the config's architecture, whatever its phases."""

from __future__ import annotations

from densemtl.config import Config
from densemtl.engine import distributed
from densemtl.engine.phased import train_phases
from densemtl.engine.prepare import prepare_run
from densemtl.metrics.delta_m import Results
from densemtl.registry import ARCHITECTURES


def run_training(config: Config, resume: bool = False) -> Results:
    """Train the config's model on its data; writes the run directory and returns the final results."""
    architecture = ARCHITECTURES.lookup(config.model.arch)
    try:
        return train_phases(config, architecture, prepare_run(config), resume)
    finally:
        distributed.cleanup()
