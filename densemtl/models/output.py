"""What every network's ``forward(image)`` returns: the contract between models, losses and the engine."""

from __future__ import annotations

from typing import Required, TypedDict

from torch import Tensor


class ModelOutput(TypedDict, total=False):
    """A model's output for a batch of images (B x 3 x H x W).

    ``pred``: ``{task: raw output B x channels x H x W}`` at the input size (what ``Task.loss`` and
    ``Task.predict`` take); the only entry a deployed inference form must give.
    ``features``: ``{task: B x C x h x w decoder feature}`` (what the contrastive regularizer uses);
    every trainable model gives it.
    ``intermediate``: ``{task: [raw, ...]}`` deep-supervision outputs at any size (weighted by
    ``mtcp.traceback_weight`` in the objective, targets resized with nearest neighbour).
    ``extra_losses``: ``{name: scalar}`` loss terms already weighted (L0 penalty, consistency, ...).
    ``activations``: ``{task: {layer: activation}}`` recorded for a phase's loss hook (computation sharing's
    temporal term).
    """

    pred: Required[dict[str, Tensor]]
    features: dict[str, Tensor]
    intermediate: dict[str, list[Tensor]]
    extra_losses: dict[str, Tensor]
    activations: dict[str, dict[str, Tensor]]
