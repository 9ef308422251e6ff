"""The trainable computation-sharing network (Shoouri et al., ICCV 2023): a base task and sub-tasks sharing
the weights of one ViT encoder.

The base task (``sharing.base_task``, semseg) has a plain ViT encoder (:mod:`densemtl.models.vit_blocks`)
and a dense decoder. Every other task (a *sub-task*) uses, for every encoder linear,
``W_sub = W_base + z * dW`` (the bias too), ``z`` a hard-concrete gate per element
(:mod:`densemtl.models.hard_concrete`), and has its own decoder. LayerNorms and the position embedding are
the base model's. Training phases (``phase`` buffer, saved in checkpoints; the order and step counts are
in :mod:`densemtl.models.sharing.architecture`):

0. ``base``: the base encoder and decoder, base task loss only;
1. ``delta``: base frozen; deltas, gates and sub-task decoders, + ``l0_weight * E[L0]``;
2. ``finetune``: each gate frozen to the mask of its test-time non-zeros (the gate value folded into
   ``dW``); only the unmasked entries of ``dW`` (and the decoders) can change;
3. ``activation``: as 2, + ``activation_weight * sum_l mean |A_l^sub - A_l^base|`` over every block's qkv,
   attention projection and MLP (fc1, fc2) outputs, the base model frozen (the mean rather than the sum
   of the L1 norm keeps the weight independent of the image size).

``temporal_weight > 0`` adds, in every phase, ``mean |A_l(x) - A_l(x')|`` of the trained encoders between an
image and a copy shifted by up to ``temporal_shift`` pixels (a pseudo next frame of a moving camera).
The deployed, token-skipping form is :class:`densemtl.models.sharing.inference.SharedInference`.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from densemtl.errors import ConfigError
from densemtl.models.hard_concrete import HardConcreteGate
from densemtl.models.output import ModelOutput
from densemtl.models.vit_blocks import DenseExecutor, TokenDecoder, ViTEncoder, Weights, load_hf_vit
from densemtl.registry import DATASETS

if TYPE_CHECKING:
    from densemtl.config import Config, ModelConfig, SharingConfig
    from densemtl.dataset_info import DatasetInfo
    from densemtl.tasks import Task

PHASES = ("base", "delta", "finetune", "activation")
VIT_ARGS = {
    "hidden_size": 96, "num_hidden_layers": 4, "num_attention_heads": 3, "intermediate_size": 384, "patch_size": 8,
}


class GatedDelta(nn.Module):
    """``dW`` of one linear (``out x (in + 1)``, the last column the bias delta), gated per element."""

    def __init__(self, out_features: int, in_features: int, gate_init: float, gate_scale: float) -> None:
        super().__init__()
        self.delta = nn.Parameter(torch.zeros(out_features, in_features + 1))
        self.gate = HardConcreteGate((out_features, in_features + 1), gate_init, gate_scale)

    def apply(self, weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gated = self.gate() * self.delta
        return weight + gated[:, :-1], bias + gated[:, -1]

    def effective(self) -> torch.Tensor:
        """The deterministic (test-time) gated delta, detached."""
        return (self.gate.deterministic() * self.delta).detach()

    @torch.no_grad()
    def freeze(self) -> None:
        """Fix the mask; fold the gate values into ``dW`` so masked-out entries are exactly 0."""
        if not bool(self.gate.frozen):
            self.delta.mul_(self.gate.freeze())


def _key(name: str) -> str:
    return name.replace(".", "_")


class SharingModel(nn.Module):
    """Base ViT + gated weight deltas + one decoder per task; see the module docstring."""

    def __init__(
        self, model_config: ModelConfig, sharing: SharingConfig, tasks: dict[str, Task], image_size: tuple[int, int]
    ) -> None:
        super().__init__()
        args = dict(VIT_ARGS)
        for key, value in model_config.backbone_args.items():
            if key not in VIT_ARGS:
                raise ConfigError(
                    f"key 'model.backbone_args.{key}': not an option of the sharing ViT (known: {', '.join(VIT_ARGS)})"
                )
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"key 'model.backbone_args.{key}': expected a positive integer, got {value!r}")
            args[key] = value
        if args["hidden_size"] % args["num_attention_heads"]:
            raise ConfigError("key 'model.backbone_args': hidden_size must be divisible by num_attention_heads")
        if sharing.base_task not in tasks:
            raise ConfigError(f"key 'sharing.base_task': '{sharing.base_task}' is not one of the tasks")
        self.tasks = tasks
        self.base_task = sharing.base_task
        self.sub_tasks = [name for name in tasks if name != sharing.base_task]
        self.sharing = sharing
        dim, patch = args["hidden_size"], args["patch_size"]
        self.encoder = ViTEncoder(
            dim, args["num_hidden_layers"], args["num_attention_heads"], args["intermediate_size"], patch, image_size
        )
        self.encoder.checkpointing = model_config.gradient_checkpointing
        self.deltas = nn.ModuleDict(
            {
                task: nn.ModuleDict(
                    {
                        _key(name): GatedDelta(lin.out_features, lin.in_features, sharing.gate_init, sharing.gate_scale)
                        for name, lin in self.encoder.named_linears()
                    }
                )
                for task in self.sub_tasks
            }
        )
        channels = model_config.head_channels
        self.decoders = nn.ModuleDict(
            {name: TokenDecoder(dim, channels, task.channels, patch) for name, task in tasks.items()}
        )
        self.feature_channels = {name: channels for name in tasks}
        self.register_buffer("phase", torch.tensor(0))
        self.set_phase(0)

    # ------------------------------------------------------------------ phases
    def set_phase(self, phase: int) -> None:
        """Switch training phase: which parameters train, and (from phase 2 on) freeze the gates."""
        if not 0 <= phase < len(PHASES):
            raise ValueError(f"phase must be in 0..{len(PHASES) - 1}, got {phase}")
        self.phase.fill_(phase)
        if phase >= 2:
            for deltas in self.deltas.values():
                for delta in deltas.values():
                    delta.freeze()
        for param in [*self.encoder.parameters(), *self.decoders[self.base_task].parameters()]:
            param.requires_grad_(phase == 0)
        for task in self.sub_tasks:
            for param in self.decoders[task].parameters():
                param.requires_grad_(phase >= 1)
            for delta in self.deltas[task].values():
                delta.delta.requires_grad_(phase >= 1)
                delta.gate.raw.requires_grad_(phase == 1)
        self.train(self.training)

    def train(self, mode: bool = True) -> SharingModel:
        """Frozen parts stay in eval mode (the base decoder's BatchNorm statistics must not move)."""
        super().train(mode)
        if int(self.phase) >= 1:
            self.encoder.eval()
            self.decoders[self.base_task].eval()
        return self

    def phase_tasks(self, phase: int) -> list[str]:
        """The tasks whose losses train phase ``phase``."""
        return [self.base_task] if phase == 0 else list(self.sub_tasks)

    def trained_tasks(self) -> list[str]:
        """The tasks whose losses train the current phase."""
        return self.phase_tasks(int(self.phase))

    # ------------------------------------------------------------------ weights
    def task_weights(self, task: str) -> Weights:
        """Every encoder linear's (weight, bias) for ``task`` (sampled gates in training mode)."""
        base = self.encoder.weights()
        if task == self.base_task:
            return base
        deltas = self.deltas[task]
        return {name: deltas[_key(name)].apply(*base[name]) for name in self.encoder.linear_names}

    def effective_deltas(self, task: str) -> dict[str, torch.Tensor]:
        """The test-time ``dW`` (with the bias column) of every linear of a sub-task."""
        return {name: self.deltas[task][_key(name)].effective() for name in self.encoder.linear_names}

    def expected_l0(self) -> torch.Tensor:
        return sum(
            (delta.gate.expected_l0() for deltas in self.deltas.values() for delta in deltas.values()),
            torch.zeros((), device=self.phase.device),
        )

    # ------------------------------------------------------------------ training forward
    def encode(self, image: torch.Tensor, task: str, record: bool = False) -> tuple[torch.Tensor, Any, DenseExecutor]:
        executor = DenseExecutor(self.task_weights(task), record=record)
        tokens, grid = self.encoder(image, executor)
        return tokens, grid, executor

    def forward(self, image: torch.Tensor) -> ModelOutput:
        size = tuple(image.shape[-2:])
        phase = int(self.phase)
        sharing_loss = self.training and phase >= 3 and self.sharing.activation_weight > 0
        pred, features, extra = {}, {}, {}
        with torch.set_grad_enabled(torch.is_grad_enabled() and phase == 0):
            tokens, grid, base_run = self.encode(image, self.base_task, record=sharing_loss)
            pred[self.base_task], features[self.base_task] = self.decoders[self.base_task](tokens, grid, size)
        if not self.training or phase >= 1:
            activation = image.new_zeros(())
            for task in self.sub_tasks:
                tokens, grid, run = self.encode(image, task, record=sharing_loss)
                pred[task], features[task] = self.decoders[task](tokens, grid, size)
                if sharing_loss:
                    activation = activation + sum(
                        (run.activations[n] - base_run.activations[n]).abs().mean() for n in run.activations
                    )
            if sharing_loss:
                extra["activation"] = self.sharing.activation_weight * activation
        if self.training and phase == 1 and self.sharing.l0_weight > 0:
            extra["l0"] = self.sharing.l0_weight * self.expected_l0()
        if self.training and self.sharing.temporal_weight > 0:
            extra["temporal"] = self.sharing.temporal_weight * self.temporal_loss(image)
        return {"pred": {t: pred[t] for t in self.tasks if t in pred}, "features": features, "extra_losses": extra}

    def temporal_loss(self, image: torch.Tensor) -> torch.Tensor:
        """Mean L1 between the trained encoders' activations on ``image`` and on a shifted copy of it."""
        shift = self.sharing.temporal_shift
        dy, dx = (int(v) for v in torch.randint(-shift, shift + 1, (2,)))
        moved = torch.roll(image, shifts=(dy, dx), dims=(-2, -1))
        total = image.new_zeros(())
        for task in self.trained_tasks():
            _, _, now = self.encode(image, task, record=True)
            _, _, then = self.encode(moved, task, record=True)
            total = total + sum((now.activations[n] - then.activations[n]).abs().mean() for n in now.activations)
        return total


def build_sharing_model(config: Config, info: DatasetInfo, tasks: dict[str, Task]) -> SharingModel:
    """The sharing model for ``config`` (``model.arch: sharing``); the ViT size comes from ``model.backbone_args``.

    With ``model.pretrained`` (a local folder or hub name of a Hugging Face ``ViTModel``) the encoder's size
    and weights come from it (:func:`load_hf_vit`); the decoders and deltas start fresh.
    """
    if config.sharing.base_task not in tasks:
        raise ConfigError(f"key 'sharing.base_task': '{config.sharing.base_task}' is not one of data.tasks")
    size = config.data.crop_size or DATASETS.lookup(config.data.dataset).native_size(config.data)
    model_config, pretrained = config.model, None
    if config.model.pretrained:
        from transformers import ViTModel

        try:
            pretrained = ViTModel.from_pretrained(config.model.pretrained, add_pooling_layer=False)
        except (OSError, ValueError) as err:
            raise ConfigError(f"model.pretrained: cannot load a ViT from '{config.model.pretrained}': {err}") from None
        hf = pretrained.config
        args = {"hidden_size": hf.hidden_size, "num_hidden_layers": hf.num_hidden_layers,
                "num_attention_heads": hf.num_attention_heads, "intermediate_size": hf.intermediate_size,
                "patch_size": hf.patch_size}
        model_config = dataclasses.replace(config.model, backbone_args=args)
    model = SharingModel(model_config, config.sharing, tasks, (int(size[0]), int(size[1])))
    if pretrained is not None:
        load_hf_vit(model.encoder, pretrained.state_dict(), config.model.pretrained)
    return model


# ---------------------------------------------------------------------- storage
def delta_storage(model: SharingModel) -> dict[str, dict[str, float]]:
    """Per sub-task: non-zero delta entries, their share, and sparse (int32 index + fp32 value) vs full bytes."""
    report = {}
    for task in model.sub_tasks:
        deltas = model.effective_deltas(task)
        nonzero = sum(int((d != 0).sum()) for d in deltas.values())
        total = sum(d.numel() for d in deltas.values())
        report[task] = {
            "nonzero": nonzero,
            "total": total,
            "share": nonzero / max(total, 1),
            "sparse_bytes": nonzero * 8,
            "full_bytes": total * 4,
        }
    return report
