"""The trainable computation-sharing network (Shoouri et al., ICCV 2023): a base task and sub-tasks sharing
the weights of one ViT encoder.

The base task (``sharing.base_task``, semseg) has a plain ViT encoder (:mod:`densemtl.models.vit_blocks`)
and a dense decoder. Every other task (a *sub-task*) uses, for every gated encoder tensor ``T`` (with
``sharing.gated: all``, as the released code: patch embedding, position embedding, every LayerNorm, qkv,
projection, fc1 and fc2, weights and biases; with ``linears``, the linears' weights and biases),
``T_sub = T_base + z * z_T * dT``: ``z`` a hard-concrete gate per element and ``z_T`` one per tensor
(``sharing.tensor_gates``; :mod:`densemtl.models.hard_concrete`), and has its own decoder. The final
LayerNorm is the base model's. Training phases (``phase`` buffer, saved in checkpoints; the order and step
counts are in :mod:`densemtl.models.sharing.architecture`):

0. ``base``: the base encoder and decoder, base task loss only (``base_temporal``, an optional second base
   phase, adds the temporal term below);
1. ``delta``: base frozen; deltas, gates and sub-task decoders, + ``sum_t l0_weight[t] * E[L0_t]`` (the
   expected number of non-zero gates, a sum as in the released code);
2. ``finetune``: each gate frozen to the mask of its test-time non-zeros (the gate value folded into
   ``dT``); only the unmasked entries of ``dT`` (and the decoders) can change;
3. ``activation``: as 2, + ``sum_t activation_weight[t] * sum_l r(|A_l^t - A_l^base|)`` over every block's
   ``activation_layers`` outputs (default as the code: norm1, qkv, proj, fc1, GELU, fc2), the base model
   frozen; ``r`` is the mean (``activation_reduction: mean``, resolution-independent weights) or the sum
   (``sum``, the code's form).

The temporal term ``temporal_weight * sum_l r(|A_l(x_t) - sg(A_l(x_n))|)`` compares the trained encoders'
activations on a training frame and on a neighbouring frame ``x_n`` (the batch's ``neighbour``, augmented
as the frame; ``sg``: no gradient, as the code) in the ``base_temporal`` and ``activation`` phases; with
``temporal_source: shift`` ``x_n`` is the frame shifted by up to ``temporal_shift`` pixels. The forward pass
records the activations (``output["activations"]``), :func:`temporal_hook` adds the term.
The deployed form is :class:`densemtl.models.sharing.inference.SharedInference`.
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
    """``dT`` of one encoder tensor, gated per element and (``tensor_gate``) by one scalar gate."""

    def __init__(self, shape: tuple[int, ...], sharing: SharingConfig) -> None:
        super().__init__()
        options = (sharing.gate_init, sharing.gate_scale, sharing.gate_temperature)
        self.delta = nn.Parameter(torch.zeros(shape))
        self.gate = HardConcreteGate(shape, *options)
        self.tensor_gate = HardConcreteGate((), *options) if sharing.tensor_gates else None

    def gates(self) -> list[HardConcreteGate]:
        return [self.gate] if self.tensor_gate is None else [self.gate, self.tensor_gate]

    def apply(self, base: torch.Tensor) -> torch.Tensor:
        """``base + z * z_T * dT`` (sampled gates in training mode)."""
        value = self.gate()
        if self.tensor_gate is not None:
            value = value * self.tensor_gate()
        return base + value * self.delta

    def _deterministic(self) -> torch.Tensor:
        value = self.gate.deterministic()
        return value if self.tensor_gate is None else value * self.tensor_gate.deterministic()

    def effective(self) -> torch.Tensor:
        """The deterministic (test-time) gated delta, detached."""
        return (self._deterministic() * self.delta).detach()

    def expected_l0(self) -> torch.Tensor:
        """Expected number of open gates, the per-tensor gate counted once (as the released code does)."""
        return sum((gate.expected_l0() for gate in self.gates()), torch.zeros(()))

    @torch.no_grad()
    def freeze(self) -> None:
        """Fix the masks; fold the gate values into ``dT`` so masked-out entries are exactly 0."""
        if not bool(self.gate.frozen):
            values = self._deterministic()
            for gate in self.gates():
                gate.freeze()
            self.delta.mul_(values)


def _key(name: str) -> str:
    return name.replace(".", "_")


def _per_task(sharing: SharingConfig, key: str, sub_tasks: list[str]) -> dict[str, float]:
    """``sharing.<key>`` (one number, or one per sub-task) as ``{sub-task: weight}``."""
    value = getattr(sharing, key)
    if not isinstance(value, dict):
        return dict.fromkeys(sub_tasks, float(value))
    if set(value) != set(sub_tasks):
        raise ConfigError(
            f"key 'sharing.{key}': expected one weight per sub-task ({', '.join(sub_tasks)}), got {', '.join(value)}"
        )
    return {task: float(value[task]) for task in sub_tasks}


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
        self.l0_weights = _per_task(sharing, "l0_weight", self.sub_tasks)
        self.activation_weights = _per_task(sharing, "activation_weight", self.sub_tasks)
        dim, patch = args["hidden_size"], args["patch_size"]
        self.encoder = ViTEncoder(
            dim, args["num_hidden_layers"], args["num_attention_heads"], args["intermediate_size"], patch, image_size
        )
        self.encoder.checkpointing = model_config.gradient_checkpointing
        base = self.encoder.weights()
        if sharing.gated == "all":
            self.gated_names = list(base)
        else:
            self.gated_names = [f"{lin}.{kind}" for lin in self.encoder.linear_names for kind in ("weight", "bias")]
        self.deltas = nn.ModuleDict(
            {
                task: nn.ModuleDict(
                    {_key(name): GatedDelta(tuple(base[name].shape), sharing) for name in self.gated_names}
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
        self.temporal_training = False
        self.set_phase(0)

    # ------------------------------------------------------------------ phases
    def set_phase(self, phase: int, temporal: bool = False) -> None:
        """Switch training phase: which parameters train, and (from phase 2 on) freeze the gates.

        ``temporal``: the phase adds the temporal term (when ``sharing.temporal_weight`` > 0).
        """
        if not 0 <= phase < len(PHASES):
            raise ValueError(f"phase must be in 0..{len(PHASES) - 1}, got {phase}")
        self.phase.fill_(phase)
        self.temporal_training = temporal and self.sharing.temporal_weight > 0
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
                for gate in delta.gates():
                    gate.raw.requires_grad_(phase == 1)
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

    def clip_groups(self) -> list[list[nn.Parameter]]:
        """Parameter groups clipped apart: one per sub-task in the sub-task phases (they are separate runs
        in the released code, so no task's gradient may shrink another's step), else everything."""
        if int(self.phase) == 0:
            return [[p for p in self.parameters() if p.requires_grad]]
        return [
            [p for p in (*self.deltas[task].parameters(), *self.decoders[task].parameters()) if p.requires_grad]
            for task in self.sub_tasks
        ]

    # ------------------------------------------------------------------ weights
    def task_weights(self, task: str) -> Weights:
        """Every encoder tensor for ``task`` (sampled gates in training mode)."""
        base = self.encoder.weights()
        if task == self.base_task:
            return base
        deltas = self.deltas[task]
        return {**base, **{name: deltas[_key(name)].apply(base[name]) for name in self.gated_names}}

    def effective_deltas(self, task: str) -> dict[str, torch.Tensor]:
        """The test-time ``dT`` of every gated tensor of a sub-task."""
        return {name: self.deltas[task][_key(name)].effective() for name in self.gated_names}

    def expected_l0(self, task: str) -> torch.Tensor:
        start = torch.zeros((), device=self.phase.device)
        return sum((delta.expected_l0() for delta in self.deltas[task].values()), start)

    # ------------------------------------------------------------------ training forward
    def encode(self, image: torch.Tensor, task: str, record: bool = False) -> tuple[torch.Tensor, Any, DenseExecutor]:
        """Run ``task``'s encoder; ``record`` keeps the ``activation_layers`` outputs."""
        executor = DenseExecutor(self.task_weights(task), record=self.sharing.activation_layers if record else ())
        tokens, grid = self.encoder(image, executor)
        return tokens, grid, executor

    def activation_distance(self, ours: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> torch.Tensor:
        """``sum_l r(|A_l - B_l|)`` over the recorded layers, ``r`` the ``activation_reduction``."""
        reduce = torch.sum if self.sharing.activation_reduction == "sum" else torch.mean
        return sum((reduce((ours[name] - other[name]).abs()) for name in ours), torch.zeros(()))

    def forward(self, image: torch.Tensor) -> ModelOutput:
        size = tuple(image.shape[-2:])
        phase = int(self.phase)
        training = self.training
        sharing_loss = training and phase >= 3 and any(w > 0 for w in self.activation_weights.values())
        temporal = set(self.trained_tasks()) if training and self.temporal_training else set()
        pred, features, extra, recorded = {}, {}, {}, {}
        if not training or phase == 0 or sharing_loss:
            with torch.set_grad_enabled(torch.is_grad_enabled() and phase == 0):
                record = sharing_loss or self.base_task in temporal
                tokens, grid, base_run = self.encode(image, self.base_task, record=record)
                if not training or phase == 0:
                    pred[self.base_task], features[self.base_task] = self.decoders[self.base_task](tokens, grid, size)
            if self.base_task in temporal:
                recorded[self.base_task] = base_run.activations
        if not training or phase >= 1:
            activation = image.new_zeros(())
            for task in self.sub_tasks:
                tokens, grid, run = self.encode(image, task, record=sharing_loss or task in temporal)
                pred[task], features[task] = self.decoders[task](tokens, grid, size)
                if sharing_loss:
                    distance = self.activation_distance(run.activations, base_run.activations)
                    activation = activation + self.activation_weights[task] * distance
                if task in temporal:
                    recorded[task] = run.activations
            if sharing_loss:
                extra["activation"] = activation
        if training and phase == 1 and any(w > 0 for w in self.l0_weights.values()):
            extra["l0"] = sum((w * self.expected_l0(t) for t, w in self.l0_weights.items()), image.new_zeros(()))
        output: ModelOutput = {"pred": {t: pred[t] for t in self.tasks if t in pred}, "features": features,
                               "extra_losses": extra}
        if recorded:
            output["activations"] = recorded
        return output

    def temporal_loss(self, output: ModelOutput, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """``{"temporal": weighted term}`` between the recorded activations of the batch's frames and those of
        their neighbours (computed here without gradient); ``{}`` when the forward recorded nothing."""
        recorded = output.get("activations") or {}
        if not recorded:
            return {}
        other = self._neighbour(batch)
        total = other.new_zeros(())
        with torch.no_grad():
            targets = {task: self.encode(other, task, record=True)[2].activations for task in recorded}
        for task, activations in recorded.items():
            total = total + self.activation_distance(activations, targets[task])
        return {"temporal": self.sharing.temporal_weight * total}

    def _neighbour(self, batch: dict[str, Any]) -> torch.Tensor:
        """The other frame of the temporal term: the batch's neighbouring frames, or a shifted copy."""
        image = batch["image"]
        if self.sharing.temporal_source == "shift":
            shift = self.sharing.temporal_shift
            dy, dx = (int(v) for v in torch.randint(-shift, shift + 1, (2,)))
            return torch.roll(image, shifts=(dy, dx), dims=(-2, -1))
        if "neighbour" not in batch:
            raise ConfigError(
                "key 'sharing.temporal_source': 'neighbour' needs training frames with a neighbouring frame "
                "(the synthetic scenes with data.synthetic.neighbour_offsets, e.g. [-2, -1, 1]); "
                "or set sharing.temporal_source=shift"
            )
        return batch["neighbour"]


def temporal_hook(model: nn.Module, output: ModelOutput, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The trainer's loss hook of the temporal phases (``model`` may be wrapped by DDP)."""
    return getattr(model, "module", model).temporal_loss(output, batch)


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
