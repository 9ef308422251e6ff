"""A compact plain ViT encoder whose every linear layer goes through an *executor*, and a dense decoder.

The encoder fixes the network's structure (patch embedding as a linear over flattened patches plus a
position embedding, pre-norm blocks ``x + proj(attn(qkv(norm1 x)))``, ``x + fc2(gelu(fc1(norm2 x)))``,
final norm); the executor decides how each linear, each attention and the embedding output are computed,
and with which tensors (:data:`Weights`: the base model's, or a sub-task's ``base + gated delta``; the final
norm is always the base model's). :class:`DenseExecutor` computes everything and can record activations and
a :data:`Trace` (every linear's input and output, every attention's probabilities and output, the embedding
output) that the sharing runtimes of :mod:`densemtl.models.sharing` reuse. Names: linears ``patch`` and
``blocks.{i}.{qkv,proj,fc1,fc2}``; attentions ``blocks.{i}.attn``; the embedding output ``embed``; observed
activations ``blocks.{i}.{norm1,norm2,gelu}``.

FLOPs are counted as 2 x multiply-adds of the matrix products (what ``torch.utils.flop_counter`` counts).
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from densemtl.models.checkpointing import checkpointed

Weights = dict[str, torch.Tensor]  # encoder parameter name ("pos", "blocks.0.qkv.weight", ...) -> tensor
BLOCK_LINEARS = ("qkv", "proj", "fc1", "fc2")
EMBED = "embed"
NORM_EPS = 1e-6


@dataclass
class LinearRef:
    """A linear layer's flattened input (tokens x d_in) and output (tokens x d_out) on some run."""

    x: torch.Tensor
    y: torch.Tensor


@dataclass
class AttentionRef:
    """An attention's probabilities (B x heads x N x N) and output (B x N x D) on some run."""

    probs: torch.Tensor
    out: torch.Tensor


Trace = dict[str, LinearRef | AttentionRef | torch.Tensor]  # EMBED -> the embedding output (tokens x D)


def layer_kind(name: str) -> str:
    """``blocks.3.fc1`` -> ``fc1``."""
    return name.rsplit(".", 1)[-1]


class Executor(Protocol):
    weights: Weights

    def linear(self, name: str, x: torch.Tensor) -> torch.Tensor: ...

    def attention(self, name: str, qkv: torch.Tensor, heads: int) -> torch.Tensor: ...

    def embed(self, x: torch.Tensor) -> torch.Tensor: ...

    def observe(self, name: str, x: torch.Tensor) -> torch.Tensor: ...


def split_heads(qkv: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """B x N x 3D -> q, k, v each B x heads x N x D/heads."""
    batch, tokens, width = qkv.shape
    parts = qkv.view(batch, tokens, 3, heads, width // (3 * heads)).permute(2, 0, 3, 1, 4)
    return parts[0], parts[1], parts[2]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of queries ``q`` (... x n x d) over ``k``, ``v``: (probabilities, output)."""
    probs = torch.softmax((q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2), dim=-1)
    return probs, probs @ v


def merge_heads(out: torch.Tensor) -> torch.Tensor:
    """B x heads x N x d -> B x N x heads*d."""
    return out.transpose(1, 2).flatten(2)


def attention_flops(batch: int, tokens: int, width: int) -> int:
    """FLOPs of the two attention products (scores and weighted values) over all heads."""
    return 4 * batch * tokens * tokens * width


class DenseExecutor:
    """Computes everything with ``weights``; optionally records activations and a full :data:`Trace`.

    ``record``: the layer kinds whose outputs go to ``activations`` (e.g. ``{"norm1", "qkv", "gelu"}``).
    ``trace_attention`` False leaves the attention probabilities out of the trace; without them the
    attention runs fused (``scaled_dot_product_attention``: no N x N matrix kept).
    """

    def __init__(
        self, weights: Weights, record: Collection[str] = (), trace: bool = False, trace_attention: bool = True
    ) -> None:
        self.weights = weights
        self.record = frozenset(record)
        self.activations: dict[str, torch.Tensor] = {}
        self.trace: Trace | None = {} if trace else None
        self.trace_attention = trace and trace_attention
        self.flops = 0

    def observe(self, name: str, x: torch.Tensor) -> torch.Tensor:
        if layer_kind(name) in self.record:
            self.activations[name] = x
        return x

    def linear(self, name: str, x: torch.Tensor) -> torch.Tensor:
        weight = self.weights[f"{name}.weight"]
        y = F.linear(x, weight, self.weights[f"{name}.bias"])
        self.flops += 2 * x.numel() * weight.shape[0]
        if self.trace is not None:
            self.trace[name] = LinearRef(x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1]))
        return self.observe(name, y)

    def attention(self, name: str, qkv: torch.Tensor, heads: int) -> torch.Tensor:
        q, k, v = split_heads(qkv, heads)
        if not self.trace_attention:
            out = merge_heads(F.scaled_dot_product_attention(q, k, v))
        else:
            probs, out = attend(q, k, v)
            out = merge_heads(out)
            self.trace[name] = AttentionRef(probs, out)
        self.flops += attention_flops(*out.shape)
        return out

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        if self.trace is not None:
            self.trace[EMBED] = x.reshape(-1, x.shape[-1])
        return x


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=NORM_EPS)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=NORM_EPS)
        self.fc1 = nn.Linear(dim, mlp_dim)
        self.fc2 = nn.Linear(mlp_dim, dim)


class ViTEncoder(nn.Module):
    """Plain ViT without a class token; tokens in row-major grid order, inputs padded to the patch size."""

    def __init__(
        self, dim: int, depth: int, heads: int, mlp_dim: int, patch: int, image_size: tuple[int, int]
    ) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"hidden size {dim} is not divisible by {heads} heads")
        self.dim, self.heads, self.patch_size = dim, heads, patch
        self.patch = nn.Linear(3 * patch * patch, dim)
        grid = (math.ceil(image_size[0] / patch), math.ceil(image_size[1] / patch))
        self.pos = nn.Parameter(torch.randn(1, dim, *grid) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_dim) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=NORM_EPS)
        self.linear_names = ["patch"] + [f"blocks.{i}.{n}" for i in range(depth) for n in BLOCK_LINEARS]
        self.checkpointing = False  # recompute each block's activations in the backward pass

    def weights(self) -> Weights:
        """The base model's tensors that a sub-task may change: every parameter but the final norm's."""
        return {name: param for name, param in self.named_parameters() if not name.startswith("norm.")}

    def named_linears(self) -> list[tuple[str, nn.Linear]]:
        modules = dict(self.named_modules())
        return [(name, modules[name]) for name in self.linear_names]

    def patchify(self, image: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """B x 3 x H x W -> (B x N x 3p^2 flattened patches, grid), zero-padding to a multiple of p."""
        p = self.patch_size
        height, width = image.shape[-2:]
        grid = (math.ceil(height / p), math.ceil(width / p))
        image = F.pad(image, (0, grid[1] * p - width, 0, grid[0] * p - height))
        return F.unfold(image, kernel_size=p, stride=p).transpose(1, 2), grid

    def position(self, grid: tuple[int, int], pos: torch.Tensor | None = None) -> torch.Tensor:
        """The position embedding ``pos`` (default: the base's) resampled to ``grid``, as 1 x N x D."""
        pos = self.pos if pos is None else pos
        if tuple(pos.shape[-2:]) != grid:
            pos = F.interpolate(pos, size=grid, mode="bilinear", align_corners=False)
        return pos.flatten(2).transpose(1, 2)

    def forward(self, image: torch.Tensor, executor: Executor) -> tuple[torch.Tensor, tuple[int, int]]:
        """(B x N x D final tokens, grid) with every linear and attention computed by ``executor``."""
        weights = executor.weights
        patches, grid = self.patchify(image)
        x = executor.embed(executor.linear("patch", patches) + self.position(grid, weights["pos"]))
        checkpointing = self.checkpointing and torch.is_grad_enabled()
        for index, block in enumerate(self.blocks):
            if checkpointing:
                x = checkpointed(self.block_forward, block, index, x, executor)
            else:
                x = self.block_forward(index, x, executor)
        return self.norm(x), grid

    def block_forward(self, index: int, x: torch.Tensor, executor: Executor) -> torch.Tensor:
        """Block ``index`` on the tokens ``x`` (B x N x D), with the executor's weights."""
        weights, prefix = executor.weights, f"blocks.{index}"
        h = executor.observe(f"{prefix}.norm1", self._norm(weights, f"{prefix}.norm1", x))
        attended = executor.attention(f"{prefix}.attn", executor.linear(f"{prefix}.qkv", h), self.heads)
        x = x + executor.linear(f"{prefix}.proj", attended)
        h = executor.observe(f"{prefix}.norm2", self._norm(weights, f"{prefix}.norm2", x))
        h = executor.observe(f"{prefix}.gelu", F.gelu(executor.linear(f"{prefix}.fc1", h)))
        return x + executor.linear(f"{prefix}.fc2", h)

    def _norm(self, weights: Weights, name: str, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (self.dim,), weights[f"{name}.weight"], weights[f"{name}.bias"], NORM_EPS)


class TokenDecoder(nn.Module):
    """Dense head on the token grid: 1x1 reduce, 2x upsampling stages to stride 4, 1x1 prediction."""

    def __init__(self, dim: int, channels: int, out_channels: int, patch: int) -> None:
        super().__init__()
        self.patch = patch
        self.reduce = nn.Sequential(nn.Conv2d(dim, channels, 1, bias=False), nn.BatchNorm2d(channels), nn.ReLU())
        stages = max(int(round(math.log2(patch / 4))), 0)
        self.up = nn.ModuleList(
            nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU())
            for _ in range(stages)
        )
        self.head = nn.Conv2d(channels, out_channels, 1)

    def forward(
        self, tokens: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(raw B x out x H x W at the input size, feature B x C x h x w)."""
        x = self.reduce(tokens.transpose(1, 2).reshape(tokens.shape[0], -1, *grid))
        for stage in self.up:
            x = stage(F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False))
        raw = F.interpolate(
            self.head(x), size=(grid[0] * self.patch, grid[1] * self.patch), mode="bilinear", align_corners=False
        )
        return raw[..., : size[0], : size[1]], x


# Hugging Face ViTModel parameter names of a block's parts: (transformers >= 5, transformers 4).
_HF_BLOCK = {
    "norm1": ("layernorm_before", "layernorm_before"),
    "proj": ("attention.o_proj", "attention.output.dense"),
    "norm2": ("layernorm_after", "layernorm_after"),
    "fc1": ("mlp.fc1", "intermediate.dense"),
    "fc2": ("mlp.fc2", "output.dense"),
}
_HF_QKV = (
    ("attention.q_proj", "attention.k_proj", "attention.v_proj"),
    ("attention.attention.query", "attention.attention.key", "attention.attention.value"),
)


def load_hf_vit(encoder: ViTEncoder, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy a Hugging Face ``ViTModel`` state dict into ``encoder``.

    The class token is dropped (its position embedding too) and the patch position embeddings are resampled
    (bicubic) to the encoder's grid; q, k, v are concatenated into ``qkv``. Missing or misshapen weights are a
    :class:`ConfigError` naming ``source``.
    """
    from densemtl.errors import ConfigError

    version = 0 if any(key.startswith("layers.") for key in state) else 1
    layer = ("layers.{}.", "encoder.layer.{}.")[version]

    def get(key: str) -> torch.Tensor:
        if key not in state:
            raise ConfigError(f"model.pretrained: '{source}' has no ViT weight '{key}'")
        return state[key]

    projection = get("embeddings.patch_embeddings.projection.weight")
    ours = {"patch.weight": projection.reshape(projection.shape[0], -1),
            "patch.bias": get("embeddings.patch_embeddings.projection.bias"),
            "norm.weight": get("layernorm.weight"), "norm.bias": get("layernorm.bias")}
    pos = get("embeddings.position_embeddings")[:, 1:]
    side = int(round(pos.shape[1] ** 0.5))
    pos = pos.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    ours["pos"] = F.interpolate(pos, size=tuple(encoder.pos.shape[-2:]), mode="bicubic", align_corners=False)
    for index in range(len(encoder.blocks)):
        prefix = layer.format(index)
        for kind in ("weight", "bias"):
            for mine, names in _HF_BLOCK.items():
                ours[f"blocks.{index}.{mine}.{kind}"] = get(f"{prefix}{names[version]}.{kind}")
            ours[f"blocks.{index}.qkv.{kind}"] = torch.cat([get(f"{prefix}{n}.{kind}") for n in _HF_QKV[version]])
    try:
        encoder.load_state_dict(ours)
    except RuntimeError as err:
        reason = str(err).strip().splitlines()[-1]
        raise ConfigError(f"model.pretrained: '{source}' does not fit the encoder ({reason})") from None
