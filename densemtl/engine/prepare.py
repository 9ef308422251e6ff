"""What every training run builds before its first step: the process group, the seeds, the datasets, the
tasks and the validation."""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from densemtl.config import Config
from densemtl.data import build_dataset
from densemtl.dataset_info import DatasetInfo
from densemtl.engine import distributed
from densemtl.engine.evaluate import evaluate_model
from densemtl.engine.trainer import Evaluator
from densemtl.metrics.delta_m import Results
from densemtl.tasks import Task, build_tasks


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_evaluator(config: Config, dataset: Dataset, tasks: dict[str, Task], device: torch.device) -> Evaluator:
    """The validation of a run: :func:`densemtl.engine.evaluate.evaluate_model` on ``dataset``."""

    def evaluator(model: nn.Module) -> Results:
        return evaluate_model(model, dataset, tasks, config, device=device)

    return evaluator


@dataclass
class RunSetup:
    """What every training run builds first: the process layout, the device, data and tasks."""

    dist_info: distributed.DistInfo
    device: torch.device
    train_set: Dataset
    val_set: Dataset
    info: DatasetInfo
    tasks: dict[str, Task]

    def steps_per_epoch(self, config: Config) -> int:
        """Optimiser steps in one pass over the training set (the window of epoch-based balancers)."""
        per_step = config.data.batch_size * config.train.accumulate * self.dist_info.world_size
        return max(len(self.train_set) // per_step, 1)


def prepare_run(config: Config) -> RunSetup:
    """Join torchrun's process group, seed, and build the datasets (rank 0 generates caches first) and tasks.

    Call :func:`distributed.cleanup` when the run ends (``run_training`` does it in a ``finally``).
    """
    dist_info, device = distributed.setup(config.train.device)
    seed_everything(config.train.seed)
    if not dist_info.is_main:
        distributed.barrier()  # rank 0 generates and caches the data first
    train_set = build_dataset(config.data, config.data.train_split, train=True)
    val_set = build_dataset(config.data, config.data.val_split, train=False)
    if dist_info.is_main:
        distributed.barrier()
    info = train_set.info
    tasks = build_tasks(config.data.tasks, info, config.loss.normals_loss)
    return RunSetup(dist_info, device, train_set, val_set, info, tasks)
