"""torchrun set-up: process group, device, sampler and the few collective helpers the engine needs.

``torchrun`` (single or multi-node) sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``; without them everything runs as one process and the helpers are no-ops. The backend is
NCCL on GPUs and gloo on CPUs. Only rank 0 writes files (checkpoints, logs, results).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, DistributedSampler

from densemtl.errors import ConfigError


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def env_info() -> DistInfo:
    """The rank layout given by torchrun's environment variables (one process when they are absent)."""
    return DistInfo(
        rank=int(os.environ.get("RANK", "0")),
        world_size=int(os.environ.get("WORLD_SIZE", "1")),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
    )


def resolve_device(request: str, info: DistInfo) -> torch.device:
    """``auto`` picks this rank's GPU when there is one, else the CPU; ``cuda`` means this rank's GPU."""
    if request == "auto":
        request = "cuda" if torch.cuda.is_available() else "cpu"
    if request.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"key 'train.device': '{request}' asked for but no CUDA device is available")
        if request == "cuda":
            request = f"cuda:{info.local_rank % torch.cuda.device_count()}"
        device = torch.device(request)
        torch.cuda.set_device(device)
        return device
    if request != "cpu":
        raise ConfigError(f"key 'train.device': expected auto, cpu, cuda or cuda:N, got '{request}'")
    return torch.device("cpu")


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (a no-op on the CPU): timings of GPU work need it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def setup(device_request: str = "auto") -> tuple[DistInfo, torch.device]:
    """Join the process group when launched by torchrun; return the rank layout and the device."""
    info = env_info()
    device = resolve_device(device_request, info)
    if info.enabled and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=info.rank, world_size=info.world_size)
    return info, device


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if is_active():
        dist.barrier()


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """The mean of ``tensor`` over ranks (a copy; the input is left alone)."""
    result = tensor.detach().clone()
    if is_active():
        dist.all_reduce(result, op=dist.ReduceOp.SUM)
        result /= dist.get_world_size()
    return result


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    result = tensor.detach().clone()
    if is_active():
        dist.all_reduce(result, op=dist.ReduceOp.SUM)
    return result


def all_gather_objects(value: Any) -> list[Any]:
    """``[value of rank 0, value of rank 1, ...]`` (``[value]`` in a single process)."""
    if not is_active():
        return [value]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


class ResumableSampler(DistributedSampler):
    """A ``DistributedSampler`` that can start part-way into an epoch (for exact resume).

    Used in single-process runs too (one replica), so a run sees the same sample order whatever the
    number of processes: rank r of W takes every W-th index of one seeded permutation, and the W ranks'
    batches of size b together are exactly the single-process batch of size W*b.
    """

    def __init__(self, dataset: Dataset, info: DistInfo, seed: int, shuffle: bool = True) -> None:
        super().__init__(
            dataset, num_replicas=info.world_size, rank=info.rank, shuffle=shuffle, seed=seed, drop_last=True
        )
        self.start = 0

    def set_position(self, epoch: int, start: int) -> None:
        """Iterate epoch ``epoch`` from its ``start``-th sample of this rank."""
        self.set_epoch(epoch)
        self.start = start

    def __iter__(self) -> Iterator[int]:
        return iter(list(super().__iter__())[self.start :])

    def __len__(self) -> int:
        return self.num_samples - self.start
