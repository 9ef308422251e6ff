"""The ``sharing`` architecture: four training phases (base -> sub-task deltas -> mask fine-tuning ->
activation sharing) of ``sharing.phase_steps`` steps each, with an optional ``base_temporal`` phase of
``sharing.base_temporal_steps`` after the base (the released code's temporal fine-tuning of the base);
deployed as :class:`SharedInference` in the ``sharing.inference`` mode at ``sharing.threshold``
(``sharing.temporal_threshold`` between video frames); exported with every sub-task computed densely
(:mod:`densemtl.models.sharing.dense`)."""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

from densemtl.errors import ConfigError
from densemtl.models.architecture import Architecture, Phase
from densemtl.models.sharing.dense import dense_sharing
from densemtl.models.sharing.inference import SharedInference
from densemtl.models.sharing.model import PHASES, SharingModel, build_sharing_model, temporal_hook

if TYPE_CHECKING:
    from densemtl.config import Config


def sharing_phases(config: Config, model: SharingModel) -> list[Phase]:
    """One phase per entry of ``sharing.phase_steps`` (plus ``base_temporal`` after the base when it has
    steps); entering a phase is ``model.set_phase``. The temporal term is on in ``base_temporal`` and
    ``activation``; the sub-task phases clip each sub-task's gradient apart."""
    steps = config.sharing.phase_steps
    if len(steps) != len(PHASES) or min(steps) < 0:
        raise ConfigError(f"key 'sharing.phase_steps': expected {len(PHASES)} step counts >= 0 ({', '.join(PHASES)})")
    stages = [(name, index, count, name == "activation") for index, (name, count) in enumerate(zip(PHASES, steps,
                                                                                                    strict=True))]
    if config.sharing.base_temporal_steps > 0:
        stages.insert(1, ("base_temporal", 0, config.sharing.base_temporal_steps, True))
    return [
        Phase(
            name, count, tuple(model.phase_tasks(index)),
            enter=partial(SharingModel.set_phase, phase=index, temporal=temporal),
            loss_hook=temporal_hook if temporal and config.sharing.temporal_weight > 0 else None,
            clip_groups=SharingModel.clip_groups if index > 0 else None,
        )
        for name, index, count, temporal in stages
    ]


def deploy_sharing(model: SharingModel, config: Config) -> SharedInference:
    sharing = config.sharing
    return SharedInference(model, sharing.threshold, sharing.temporal_threshold, mode=sharing.inference)


SHARING = Architecture(build=build_sharing_model, phases=sharing_phases, deploy=deploy_sharing, export=dense_sharing)
