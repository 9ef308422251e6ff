"""Image encoders from Hugging Face ``transformers``, all giving multi-scale features at strides 4-32.

``build_backbone(model_config)`` picks an encoder by ``model.backbone``: a family name (``resnet``,
``convnext``, ``swin``, ``mobilenetv2``, ``segformer``, ``vit``, ``dinov2``) built from the
``transformers`` defaults (ResNet-50, ConvNeXt-T, Swin-T, ViT-B/16, DINOv2-B/14, ...), or a preset
from :data:`PRESETS` (a family plus config fields, e.g. ``resnet-tiny`` for CPU, ``vit-s``).
``model.backbone_args`` overrides fields of the ``transformers`` config on top of either. Weights are
random unless ``model.pretrained`` names a hub model or a local ``save_pretrained`` folder; then the
architecture comes from that checkpoint (plus ``backbone_args``), and presets add nothing.

Every backbone pads the image at the bottom and right to a multiple of 32 (zeros, i.e. the mean
colour after normalisation), so feature ``i`` covers the padded image at stride ``strides[i]``;
:func:`densemtl.models.decoders.resize_to_input` maps a map back onto the unpadded image.
Plain ViTs (``vit``, ``dinov2``) give the patch tokens of ``model.feature_layers`` (1-based block
indices, default four evenly spaced), reshaped to maps and resampled to the four strides with
(transposed) convolutions, as DPT does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from densemtl.errors import ConfigError
from densemtl.models.checkpointing import checkpointed, enable_hf_checkpointing

if TYPE_CHECKING:
    from densemtl.config import ModelConfig

STRIDES = (4, 8, 16, 32)
SIZE_DIVISOR = 32
STAGES = ["stage1", "stage2", "stage3", "stage4"]


class Backbone(nn.Module):
    """Pads the image to a multiple of 32, then ``extract`` gives one map per stride in :data:`STRIDES`."""

    strides: tuple[int, ...] = STRIDES
    size_divisor: int = SIZE_DIVISOR

    def __init__(self, channels: list[int]) -> None:
        super().__init__()
        self.channels = list(channels)
        self.checkpoint_whole = False  # recompute all of ``extract`` in the backward pass

    def extract(self, image: torch.Tensor) -> list[torch.Tensor]:
        raise NotImplementedError

    def enable_checkpointing(self) -> None:
        """Activation checkpointing (``model.gradient_checkpointing``): block by block where the Hugging Face
        model supports it, else the whole encoder as one segment."""
        self.checkpoint_whole = not enable_hf_checkpointing(getattr(self, "model", self))

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        height, width = image.shape[-2:]
        pad_h, pad_w = -height % self.size_divisor, -width % self.size_divisor
        if pad_h or pad_w:
            image = F.pad(image, (0, pad_w, 0, pad_h))
        if self.checkpoint_whole and self.training and torch.is_grad_enabled():
            return checkpointed(self.extract, self, image)
        return self.extract(image)


class HFBackbone(Backbone):
    """A ``transformers`` backbone class (``*Backbone``) that returns ``feature_maps`` for stages 1-4."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(list(model.channels))
        self.model = model

    def extract(self, image: torch.Tensor) -> list[torch.Tensor]:
        return list(self.model(pixel_values=image).feature_maps)


class HiddenStateBackbone(Backbone):
    """A model whose ``hidden_states`` are maps; keeps the last one at each stride (MobileNetV2, MiT)."""

    def __init__(self, model: nn.Module) -> None:
        probe = torch.zeros(1, 3, 2 * SIZE_DIVISOR, 2 * SIZE_DIVISOR)
        model.eval()
        with torch.no_grad():
            states = model(pixel_values=probe, output_hidden_states=True).hidden_states
        model.train()
        by_stride = {probe.shape[-1] // s.shape[-1]: i for i, s in enumerate(states) if s.dim() == 4}
        missing = [s for s in STRIDES if s not in by_stride]
        if missing:
            raise ConfigError(f"model.backbone: {type(model).__name__} gives no features at strides {missing}")
        self.indices = [by_stride[s] for s in STRIDES]
        super().__init__([states[i].shape[1] for i in self.indices])
        self.model = model

    def extract(self, image: torch.Tensor) -> list[torch.Tensor]:
        states = self.model(pixel_values=image, output_hidden_states=True).hidden_states
        return [states[i] for i in self.indices]


class ViTBackbone(Backbone):
    """A plain ViT: tokens of chosen blocks -> 2-D maps -> resampled to strides 4/8/16/32 (DPT-style)."""

    def __init__(self, model: nn.Module, layers: list[int], interpolate_flag: bool) -> None:
        hidden = model.config.hidden_size
        super().__init__([max(hidden // 8, 8), max(hidden // 4, 8), max(hidden // 2, 8), hidden])
        self.model = model
        self.layers = list(layers)
        self.patch_size = int(model.config.patch_size)
        self.interpolate_flag = interpolate_flag
        self.norm = model.layernorm
        self.project = nn.ModuleList(nn.Conv2d(hidden, c, 1) for c in self.channels)
        self.resample = nn.ModuleList(
            self._resampler(c, self.patch_size / stride) for c, stride in zip(self.channels, STRIDES, strict=True)
        )

    @staticmethod
    def _resampler(channels: int, scale: float) -> nn.Module:
        factor = round(scale) if scale >= 1 else round(1 / scale)
        if scale >= 2:
            return nn.ConvTranspose2d(channels, channels, factor, stride=factor)
        if scale <= 0.5:
            return nn.Conv2d(channels, channels, 3, stride=factor, padding=1)
        return nn.Identity()

    def extract(self, image: torch.Tensor) -> list[torch.Tensor]:
        height, width = image.shape[-2:]
        patch = self.patch_size
        image = F.pad(image, (0, -width % patch, 0, -height % patch))
        grid = (image.shape[-2] // patch, image.shape[-1] // patch)
        kwargs = {"interpolate_pos_encoding": True} if self.interpolate_flag else {}
        states = self.model(pixel_values=image, output_hidden_states=True, **kwargs).hidden_states
        features = []
        for layer, project, resample, stride in zip(self.layers, self.project, self.resample, STRIDES, strict=True):
            tokens = self.norm(states[layer])[:, -grid[0] * grid[1] :]
            fmap = tokens.transpose(1, 2).reshape(tokens.shape[0], -1, *grid)
            fmap = resample(project(fmap))
            target = (height // stride, width // stride)
            if fmap.shape[-2:] != target:
                fmap = F.interpolate(fmap, size=target, mode="bilinear", align_corners=False)
            features.append(fmap)
        return features


@dataclass(frozen=True)
class Family:
    """How to build one backbone family from ``transformers``."""

    config_class: str
    model_class: str
    kind: str  # "backbone" (feature_maps), "hidden" (hidden_states maps) or "vit" (tokens)
    fixed: dict[str, Any] = field(default_factory=dict)  # config fields the wrapper needs
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    # Modules (replaced by identities) and parameters (frozen) the features never use: no wasted
    # compute, and DDP needs no ``find_unused_parameters``.
    unused: tuple[str, ...] = ()
    # Config fields newer ``transformers`` default to tuples where the model concatenates them with lists.
    list_fields: tuple[str, ...] = ()


FAMILIES: dict[str, Family] = {
    "resnet": Family("ResNetConfig", "ResNetBackbone", "backbone", {"out_features": STAGES}),
    "convnext": Family(
        "ConvNextConfig", "ConvNextBackbone", "backbone", {"out_features": STAGES}, list_fields=("hidden_sizes",)
    ),
    "swin": Family("SwinConfig", "SwinBackbone", "backbone", {"out_features": STAGES}, unused=("swin.layernorm",)),
    "mobilenetv2": Family(
        "MobileNetV2Config",
        "MobileNetV2Model",
        "hidden",
        model_kwargs={"add_pooling_layer": False},
        unused=("conv_1x1",),
    ),
    "segformer": Family("SegformerConfig", "SegformerModel", "hidden", {"reshape_last_stage": True}),
    "vit": Family("ViTConfig", "ViTModel", "vit", model_kwargs={"add_pooling_layer": False}),
    "dinov2": Family("Dinov2Config", "Dinov2Model", "vit", unused=("embeddings.mask_token",)),
}

PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    # The CPU default: ~1.3M parameters, trains in minutes on 96x128 images.
    "resnet-tiny": (
        "resnet",
        {"embedding_size": 32, "hidden_sizes": [32, 64, 128, 256], "depths": [1, 1, 1, 1], "layer_type": "basic"},
    ),
    "resnet-18": ("resnet", {"hidden_sizes": [64, 128, 256, 512], "depths": [2, 2, 2, 2], "layer_type": "basic"}),
    "vit-s": (
        "vit",
        {
            "hidden_size": 384,
            "num_hidden_layers": 12,
            "num_attention_heads": 6,
            "intermediate_size": 1536,
            "patch_size": 16,
        },
    ),
    "dinov2-s": (
        "dinov2",
        {"hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6, "patch_size": 14},
    ),
}


def backbone_names() -> list[str]:
    return sorted(FAMILIES) + sorted(PRESETS)


def _check_layers(layers: list[int] | None, depth: int) -> list[int]:
    if layers is None:
        return [max(1, round(depth * k / 4)) for k in range(1, 5)]
    if len(layers) != len(STRIDES) or not all(1 <= layer <= depth for layer in layers):
        raise ConfigError(f"model.feature_layers: expected {len(STRIDES)} block indices in 1..{depth}, got {layers}")
    return list(layers)


def _as_lists(config: Any, family: Family) -> Any:
    """``config`` with the family's :attr:`Family.list_fields` turned from tuples into lists."""
    for name in family.list_fields:
        setattr(config, name, list(getattr(config, name)))
    return config


def build_backbone(model_config: ModelConfig) -> Backbone:
    """The encoder named by ``model.backbone`` (see the module docstring for names and options)."""
    import transformers

    name = model_config.backbone
    if name in PRESETS:
        family_name, preset_args = PRESETS[name]
    elif name in FAMILIES:
        family_name, preset_args = name, {}
    else:
        raise ConfigError(f"model.backbone: unknown backbone '{name}' (known: {', '.join(backbone_names())})")
    family = FAMILIES[family_name]
    config_class = getattr(transformers, family.config_class)
    model_class = getattr(transformers, family.model_class)
    unknown = sorted(set(model_config.backbone_args) - set(config_class().to_dict()))
    if unknown:
        raise ConfigError(
            f"model.backbone_args: {', '.join(unknown)} not fields of {family.config_class} (backbone '{name}')"
        )
    overrides = {**family.fixed, **dict(model_config.backbone_args)}
    if model_config.pretrained:
        try:
            config = _as_lists(config_class.from_pretrained(model_config.pretrained, **overrides), family)
            model = model_class.from_pretrained(model_config.pretrained, config=config, **family.model_kwargs)
        except (OSError, ValueError) as err:
            raise ConfigError(f"model.pretrained: cannot load '{model_config.pretrained}': {err}") from None
    else:
        try:
            config = _as_lists(config_class(**{**preset_args, **overrides}), family)
            model = model_class(config, **family.model_kwargs)
        except (TypeError, ValueError, AttributeError) as err:
            raise ConfigError(f"model.backbone_args: invalid for backbone '{name}': {err}") from None
    for path in family.unused:
        parent_path, _, attribute = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        if isinstance(getattr(parent, attribute), nn.Parameter):
            getattr(parent, attribute).requires_grad_(False)
        else:
            setattr(parent, attribute, nn.Identity())
    backbone = _wrap(model, family, model_config, interpolate_flag=family_name == "vit")
    if model_config.gradient_checkpointing:
        backbone.enable_checkpointing()
    return backbone


def _wrap(model: nn.Module, family: Family, model_config: ModelConfig, interpolate_flag: bool) -> Backbone:
    """The :class:`Backbone` that turns ``model``'s outputs into the four feature maps."""
    if family.kind == "backbone":
        return HFBackbone(model)
    if family.kind == "hidden":
        return HiddenStateBackbone(model)
    layers = _check_layers(model_config.feature_layers, model.config.num_hidden_layers)
    return ViTBackbone(model, layers, interpolate_flag)
