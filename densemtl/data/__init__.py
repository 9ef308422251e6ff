"""Datasets behind one sample format; which ones exist is the DATASETS table of :mod:`densemtl.registry`."""

from __future__ import annotations

from densemtl.config import DataConfig
from densemtl.data.base import DenseDataset
from densemtl.errors import ConfigError
from densemtl.registry import DATASETS


def build_dataset(data: DataConfig, split: str, train: bool) -> DenseDataset:
    """The dataset named by ``data.dataset`` for ``split``; ``train`` turns on augmentation.

    Every dataset returned has an ``info`` attribute (:class:`densemtl.dataset_info.DatasetInfo`). An
    unknown name, or a data setting the dataset cannot run with (:meth:`DenseDataset.config_problems`), is a
    ConfigError naming the key.
    """
    dataset = DATASETS.lookup(data.dataset)
    for key, why in dataset.config_problems(data, train):
        raise ConfigError(f"key '{key}': {why}")
    return dataset(data, split, train)
