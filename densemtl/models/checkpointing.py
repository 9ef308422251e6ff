"""Activation (gradient) checkpointing: keep a segment's inputs, recompute its activations in the backward pass.

``model.gradient_checkpointing`` trades about one more forward of the checkpointed part for not storing its
activations, which is what lets ViT-L and Swin train at 448x576 or 512x512 on one GPU. Hugging Face models that
support it checkpoint block by block (:func:`enable_hf_checkpointing`); other encoders run through
:func:`checkpointed`. The recomputation must not count as a second forward: BatchNorm running statistics are put
back as the first forward left them, so a checkpointed run trains exactly like one without.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import checkpoint


@contextlib.contextmanager
def _batchnorm_statistics_kept(module: nn.Module) -> Iterator[None]:
    """Undo what the block runs inside do to ``module``'s BatchNorm buffers (running mean, variance, count)."""
    buffers = [buffer for norm in module.modules() if isinstance(norm, _BatchNorm)
               for buffer in norm.buffers(recurse=False)]
    saved = [buffer.clone() for buffer in buffers]
    try:
        yield
    finally:
        for buffer, value in zip(buffers, saved, strict=True):
            buffer.copy_(value)


def checkpointed(function: Callable[..., Any], module: nn.Module, *args: Any) -> Any:
    """``function(*args)``, its activations recomputed in the backward pass; ``module`` holds its parameters and
    BatchNorm layers. The random state is replayed, so dropout draws the same masks twice. Under torch.compile
    the recomputation is part of the compiled backward, which replays no buffer update (and dynamo takes no
    ``context_fn``)."""
    if torch.compiler.is_compiling():
        return checkpoint(function, *args, use_reentrant=False)
    return checkpoint(function, *args, use_reentrant=False,
                      context_fn=lambda: (contextlib.nullcontext(), _batchnorm_statistics_kept(module)))


def enable_hf_checkpointing(model: nn.Module) -> bool:
    """Switch on a Hugging Face model's own per-block checkpointing; False when the model has none."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        return False
    kwargs = {"use_reentrant": False}  # the reentrant form drops parameter gradients when no input needs one
    enable = getattr(model, "activation_checkpointing_enable", None)  # the name since transformers 5
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return True
