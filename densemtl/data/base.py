"""What every dataset provides: samples in one dict format, and its facts as class attributes.

A sample is ``{"image": float 3 x H x W (normalised), <task>: target tensor, "meta": {...}}`` with the
target conventions of :mod:`densemtl.tasks`, and ``meta`` holding at least ``name`` (str) and ``size``
(the original ``(H, W)`` before any padding or crop), so predictions can be cropped back and saved.

Partial labels: a sample without a task's label (a missing file in a dataset declared partial, a label
dropped on purpose in the synthetic scenes) still has a target of the usual shape, every pixel invalid
(:meth:`Task.empty_target`), and lists the task in ``meta["missing"]``. :func:`labelled_mask` turns that
into a per-sample mask of a batch: the objective masks the task's loss per sample with it, evaluation skips
those samples for that task.

A dataset is a :class:`DenseDataset` subclass and one row of :data:`densemtl.registry.DATASETS`.
``build_dataset``, the bench, the CLI and ``densemtl data check`` read its class attributes and class
methods, so they know a dataset without naming it and without its files.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch.utils.data import Dataset

from densemtl.config import DataConfig
from densemtl.dataset_info import DatasetInfo
from densemtl.errors import DataError


class DenseDataset(Dataset):
    """One split of a dataset in the sample format above; ``info`` holds its :class:`DatasetInfo`.

    Subclasses take ``(data_config, split, train)`` (``train`` turns on augmentation), set the class
    attributes and implement :meth:`dataset_info` and :meth:`native_size`.
    """

    dataset_name: ClassVar[str]  # its row in DATASETS: the name in messages and in DatasetInfo
    title: ClassVar[str]  # the name people know it by ("NYUD-v2"), for reports
    supported_tasks: ClassVar[tuple[str, ...]]  # the tasks it has labels for
    needs_root: ClassVar[bool] = True  # read from the folder data.root (False: generated)
    info: DatasetInfo

    @classmethod
    def dataset_info(cls, tasks: Iterable[str]) -> DatasetInfo:
        """Its facts (class counts and names, boundary tolerance) for a run on ``tasks``; no file is read."""
        raise NotImplementedError

    @classmethod
    def native_size(cls, data_config: DataConfig) -> tuple[int, int]:
        """The ``(H, W)`` its images are evaluated at (what a bench measures when no crop is set)."""
        raise NotImplementedError

    @classmethod
    def config_problems(cls, data_config: DataConfig, train: bool) -> list[tuple[str, str]]:
        """``(key, why)`` for each data setting it cannot run with (``train``: for training batches);
        :func:`build_dataset` fails on the first."""
        if cls.needs_root and not data_config.root:
            return [("data.root", f"dataset '{cls.dataset_name}' needs the folder holding it")]
        return []

    def targets(self, index: int) -> dict[str, Any]:
        """Sample ``index`` without its image: the targets and ``meta`` (what scoring saved predictions needs).

        Datasets that can skip decoding and normalising the photo override it."""
        sample = dict(self[index])
        del sample["image"]
        return sample

    @classmethod
    def check_tasks(cls, tasks: Iterable[str]) -> tuple[str, ...]:
        """``tasks`` as a tuple, or a DataError naming those it has no labels for."""
        tasks = tuple(tasks)
        unknown = [task for task in tasks if task not in cls.supported_tasks]
        if unknown:
            raise DataError(
                f"dataset '{cls.dataset_name}' has no labels for {', '.join(unknown)} "
                f"(available: {', '.join(cls.supported_tasks)})"
            )
        return tasks


def loader_options(data_config: DataConfig, device: torch.device) -> dict[str, Any]:
    """The DataLoader keyword arguments of the ``data`` section: workers, pinned memory (with CUDA only),
    persistent workers and prefetch."""
    options: dict[str, Any] = {"num_workers": data_config.num_workers,
                               "pin_memory": data_config.pin_memory and device.type == "cuda"}
    if data_config.num_workers > 0:
        options["persistent_workers"] = data_config.persistent_workers
        if data_config.prefetch_factor is not None:
            options["prefetch_factor"] = data_config.prefetch_factor
    return options


def labelled_mask(batch: dict[str, Any], task: str) -> torch.Tensor | None:
    """Which samples of a collated batch have a label for ``task`` (bool, B); None when all have one (or the
    batch carries no ``meta``)."""
    present = [task not in meta.get("missing", ()) for meta in batch.get("meta", ())]
    return None if all(present) else torch.tensor(present)


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors; keep ``meta`` as a list of dicts."""
    batch: dict[str, Any] = {"meta": [sample["meta"] for sample in samples]}
    for key in samples[0]:
        if key != "meta":
            batch[key] = torch.stack([sample[key] for sample in samples])
    return batch
