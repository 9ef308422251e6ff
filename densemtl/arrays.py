"""Tensor-to-array conversion, the one place where predictions and targets leave torch for numpy."""

from __future__ import annotations

import numpy as np
import torch


def as_numpy(value: torch.Tensor | np.ndarray, float_dtype: torch.dtype) -> np.ndarray:
    """A CPU numpy array of ``value``: a tensor is detached and its floating values converted to
    ``float_dtype`` (float32 for pictures and files, float64 where metrics need exact sums); integer
    tensors and anything that is not a tensor keep their dtype."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        return value.to(float_dtype).numpy() if value.is_floating_point() else value.numpy()
    return np.asarray(value)
