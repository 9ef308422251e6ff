"""A compact plain ViT encoder whose every linear layer goes through an *executor*, and a dense decoder.

The encoder fixes the network's structure (patch embedding as a linear over flattened patches, pre-norm
blocks ``x + proj(attn(qkv(norm1 x)))``, ``x + fc2(gelu(fc1(norm2 x)))``, final norm); the executor decides
how each linear and each attention is computed. :class:`DenseExecutor` computes everything, with any set of
weights (the base model's or a sub-task's ``W_base + z * dW``), and can record activations and a
:data:`Trace` (every linear's input and output, every attention's probabilities and output) that the
token-skipping executor of :mod:`densemtl.models.sharing` reuses. Linear names: ``patch`` and
``blocks.{i}.{qkv,proj,fc1,fc2}``; attentions: ``blocks.{i}.attn``.

FLOPs are counted as 2 x multiply-adds of the matrix products (what ``torch.utils.flop_counter`` counts).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from densemtl.models.checkpointing import checkpointed

Weights = dict[str, tuple[torch.Tensor, torch.Tensor]]
BLOCK_LINEARS = ("qkv", "proj", "fc1", "fc2")


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


Trace = dict[str, LinearRef | AttentionRef]


class Executor(Protocol):
    def linear(self, name: str, x: torch.Tensor) -> torch.Tensor: ...

    def attention(self, name: str, qkv: torch.Tensor, heads: int) -> torch.Tensor: ...


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


class DenseExecutor:
    """Computes every linear with ``weights``; optionally records outputs and a full :data:`Trace`."""

    def __init__(self, weights: Weights, record: bool = False, trace: bool = False) -> None:
        self.weights = weights
        self.activations: dict[str, torch.Tensor] | None = {} if record else None
        self.trace: Trace | None = {} if trace else None
        self.flops = 0

    def linear(self, name: str, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weights[name]
        y = F.linear(x, weight, bias)
        self.flops += 2 * x.numel() * weight.shape[0]
        if self.activations is not None and name != "patch":
            self.activations[name] = y
        if self.trace is not None:
            self.trace[name] = LinearRef(x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1]))
        return y

    def attention(self, name: str, qkv: torch.Tensor, heads: int) -> torch.Tensor:
        q, k, v = split_heads(qkv, heads)
        probs, out = attend(q, k, v)
        out = merge_heads(out)
        batch, tokens, width = out.shape
        self.flops += 4 * batch * tokens * tokens * width
        if self.trace is not None:
            self.trace[name] = AttentionRef(probs, out)
        return out


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
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
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.linear_names = ["patch"] + [f"blocks.{i}.{n}" for i in range(depth) for n in BLOCK_LINEARS]
        self.checkpointing = False  # recompute each block's activations in the backward pass

    def weights(self) -> Weights:
        """The base model's weights of every linear, by name."""
        return {name: (module.weight, module.bias) for name, module in self.named_linears()}

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

    def position(self, grid: tuple[int, int]) -> torch.Tensor:
        pos = self.pos
        if tuple(pos.shape[-2:]) != grid:
            pos = F.interpolate(pos, size=grid, mode="bilinear", align_corners=False)
        return pos.flatten(2).transpose(1, 2)

    def forward(self, image: torch.Tensor, executor: Executor) -> tuple[torch.Tensor, tuple[int, int]]:
        """(B x N x D final tokens, grid) with every linear and attention computed by ``executor``."""
        patches, grid = self.patchify(image)
        x = executor.linear("patch", patches) + self.position(grid)
        checkpointing = self.checkpointing and torch.is_grad_enabled()
        for index, block in enumerate(self.blocks):
            if checkpointing:
                x = checkpointed(self.block_forward, block, index, x, executor)
            else:
                x = self.block_forward(index, x, executor)
        return self.norm(x), grid

    def block_forward(self, index: int, x: torch.Tensor, executor: Executor) -> torch.Tensor:
        """Block ``index`` on the tokens ``x`` (B x N x D)."""
        block, prefix = self.blocks[index], f"blocks.{index}"
        qkv = executor.linear(f"{prefix}.qkv", block.norm1(x))
        x = x + executor.linear(f"{prefix}.proj", executor.attention(f"{prefix}.attn", qkv, self.heads))
        return x + executor.linear(f"{prefix}.fc2", F.gelu(executor.linear(f"{prefix}.fc1", block.norm2(x))))


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
