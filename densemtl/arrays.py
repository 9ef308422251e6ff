"""Tensor-array conversion, the one place where predictions and targets leave torch for numpy (and where
loaded arrays enter torch)."""

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


def as_tensor(value: torch.Tensor | np.ndarray) -> torch.Tensor:
    """A tensor sharing the memory of ``value`` where it can (an array is made contiguous first); a tensor
    is returned as it is."""
    return torch.as_tensor(np.ascontiguousarray(value) if isinstance(value, np.ndarray) else value)


def all_finite(values: torch.Tensor | np.ndarray) -> bool:
    """Whether every value is finite. Read from the sum first (a finite sum has finite terms: one cheap pass
    over a whole map); every value is checked only when the sum is not finite (NaN, inf or an overflow)."""
    module = torch if isinstance(values, torch.Tensor) else np
    return bool(module.isfinite(values.sum())) or bool(module.isfinite(values).all())
