"""Datasets behind one sample format; which ones exist is the DATASETS table of :mod:`densemtl.registry`."""

from __future__ import annotations

from densemtl.config import DataConfig
from densemtl.data.base import DenseDataset
from densemtl.registry import DATASETS


def build_dataset(data: DataConfig, split: str, train: bool) -> DenseDataset:
    """The dataset named by ``data.dataset`` for ``split``; ``train`` turns on augmentation.

    Every dataset returned has an ``info`` attribute (:class:`densemtl.dataset_info.DatasetInfo`). An
    unknown name is a ConfigError listing the known ones.
    """
    return DATASETS.lookup(data.dataset)(data, split, train)
