"""Datasets: the embedded synthetic scenes, NYUD-v2 and PASCAL-Context, behind one sample format."""

from __future__ import annotations

from torch.utils.data import Dataset

from densemtl.config import DataConfig


def build_dataset(data: DataConfig, split: str, train: bool) -> Dataset:
    """The dataset named by ``data.dataset`` for ``split``; ``train`` turns on augmentation.

    Every dataset returned has an ``info`` attribute (:class:`densemtl.data.base.DatasetInfo`).
    """
    if data.dataset == "synthetic":
        from densemtl.data.synthetic import SyntheticDataset

        return SyntheticDataset(data, split, train)
    if data.dataset == "nyud":
        from densemtl.data.nyud import NYUDDataset

        return NYUDDataset(data, split, train)
    from densemtl.data.pascal import PascalContextDataset

    return PascalContextDataset(data, split, train)
