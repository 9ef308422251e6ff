"""The ``sharing`` architecture: four training phases (base -> sub-task deltas -> mask fine-tuning ->
activation sharing) of ``sharing.phase_steps`` steps each, deployed as token-skipping inference at
``sharing.threshold`` (``sharing.temporal_threshold`` between video frames), and exported with dense
sub-tasks (:mod:`densemtl.models.sharing.dense`)."""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

from densemtl.errors import ConfigError
from densemtl.models.architecture import Architecture, Phase
from densemtl.models.sharing.dense import dense_sharing
from densemtl.models.sharing.inference import SharedInference
from densemtl.models.sharing.model import PHASES, SharingModel, build_sharing_model

if TYPE_CHECKING:
    from densemtl.config import Config


def sharing_phases(config: Config, model: SharingModel) -> list[Phase]:
    """One phase per entry of ``sharing.phase_steps``; entering phase ``i`` is ``model.set_phase(i)``."""
    steps = config.sharing.phase_steps
    if len(steps) != len(PHASES) or min(steps) < 0:
        raise ConfigError(f"key 'sharing.phase_steps': expected {len(PHASES)} step counts >= 0 ({', '.join(PHASES)})")
    return [
        Phase(name, count, tuple(model.phase_tasks(index)), enter=partial(SharingModel.set_phase, phase=index))
        for index, (name, count) in enumerate(zip(PHASES, steps, strict=True))
    ]


def deploy_sharing(model: SharingModel, config: Config) -> SharedInference:
    return SharedInference(model, config.sharing.threshold, config.sharing.temporal_threshold)


SHARING = Architecture(build=build_sharing_model, phases=sharing_phases, deploy=deploy_sharing, export=dense_sharing)
