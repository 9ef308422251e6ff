"""The dense form of a trained sharing model: every task's encoder run in full at its test-time weights.

:class:`~densemtl.models.sharing.inference.SharedInference` decides per token at run time what to recompute,
which no static graph can express; this form is what it computes at ``sharing.threshold=0``, with each
sub-task's ``W_base + z * dW`` folded into plain tensors once, so tracing it (ONNX export) meets no gate, no
phase buffer and no branch on tensor values.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.utils._pytree import tree_map

from densemtl.models.output import ModelOutput
from densemtl.models.vit_blocks import DenseExecutor

if TYPE_CHECKING:
    from densemtl.config import Config
    from densemtl.models.sharing.model import SharingModel


class DenseSharing(nn.Module):
    """``image -> {"pred": {task: raw}}`` with every task computed densely (the sub-task networks at tau = 0)."""

    def __init__(self, model: SharingModel) -> None:
        super().__init__()
        self.tasks = model.tasks
        self.encoder = model.encoder
        self.decoders = model.decoders
        was_training = model.training
        model.eval()  # test-time gates
        with torch.no_grad():
            self.weights = {task: tree_map(torch.Tensor.clone, model.task_weights(task)) for task in self.tasks}
        model.train(was_training)

    def forward(self, image: torch.Tensor) -> ModelOutput:
        size = (image.shape[-2], image.shape[-1])
        pred = {}
        for task in self.tasks:
            tokens, grid = self.encoder(image, DenseExecutor(self.weights[task]))
            pred[task], _ = self.decoders[task](tokens, grid, size)
        return {"pred": pred}


def dense_sharing(model: SharingModel, config: Config) -> DenseSharing:
    return DenseSharing(model)
