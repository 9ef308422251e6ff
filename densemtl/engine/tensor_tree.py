"""The tensors inside nested dicts and lists (a checkpoint's state, a model's weights): walked in order and
hashed, so that a checkpoint and an exported model folder check their weights the same way."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import torch


def iter_tensors(tree: Any, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """``(path, tensor)`` for every tensor inside nested dicts, lists and tuples, in their order."""
    if torch.is_tensor(tree):
        yield prefix, tree
    elif isinstance(tree, dict):
        for key, value in tree.items():
            yield from iter_tensors(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(tree, (list, tuple)):
        for index, value in enumerate(tree):
            yield from iter_tensors(value, f"{prefix}[{index}]")


def tensors_digest(tree: Any) -> str:
    """A hash of every tensor of ``tree``: its path, dtype, shape and bytes, in the tree's order."""
    digest = hashlib.blake2b(digest_size=16)
    for path, tensor in iter_tensors(tree):
        digest.update(f"{path}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()
