"""Inference of a trained :class:`~densemtl.models.sharing.model.SharingModel` reusing activations across tasks
and across video frames (the ``sharing`` architecture's deployed form), in two modes (``sharing.inference``).

A sub-task is run against a *reference* run: the base task's run of the same frame, or (video) its own run
of the previous frame. The thresholded *points* are the embedding output (patch embedding + position) and
every block's qkv, projection, fc1 (before the GELU) and fc2 outputs.

**element** (the released code's rule, ``multimae_utils_sparse``): at every point the sub-task's output
``y`` is computed from its own input with its own weights and compared with the reference output ``y_r``
element by element: ``d = y - y_r``, elements with ``|d| < tau`` are set to 0 and ``y_r + d`` is passed on
(each element is either the reference's value or the sub-task's exact one). The code does not threshold
the embedding output; densemtl does, so that a huge ``tau`` gives exactly the base encoder (a deviation).
The computation is dense (no time is saved); the cost is *counted* from the measured densities
``rho_p = #{|d| >= tau} / numel(d)``:

    F = sum_p rho_p * 2 N d_in,p d_out,p  +  sum_blocks 4 N^2 D  +  F_decoder

(per image; ``p`` over the points, the embedding point counted with the patch linear's size; attention
products and decoders counted dense): the multiply-adds of the output elements that differ from the
reference, as a kernel that knew them would compute them. A dense run is the same formula with every
``rho_p = 1``.

**token** (structured, for measured wall-time savings): for a linear with reference input ``x_r`` and
output ``y_r = W_r x_r + b_r``, the sub-task's exact output is, with ``dx = x - x_r``, ``dW = W - W_r``,
``db = b - b_r``::

    y = W x + b = y_r + (dW x_r + db) + W dx

Per token: if ``max |dx| > tau`` the token is *recomputed*, ``y = W x + b`` on the gathered tokens only
(scattered back into a copy of ``y_r``); otherwise ``dx`` is dropped and the token keeps ``y_r`` plus the
weight-delta correction ``c = dW x_r + db`` (a CSR product when ``dW`` is sparse enough), itself kept only
where ``max |c| > tau``. The embedding output keeps the reference's token unless its largest change exceeds
``tau``. Attention: a query row is recomputed (against all current keys and values) when its own q/k/v
changed, or when the reference attention mass it puts on changed tokens times their largest q/k/v change
exceeds ``tau``; other rows keep the reference output. LayerNorms, GELU and residual additions run on all
tokens (element-wise, cheap); FLOPs count the matrix products actually executed.

In both modes ``tau = 0`` gives the dense sub-task and a huge ``tau`` gives exactly the base activations.

**Across time.** On a keyframe the base runs densely and the sub-tasks as above. On other frames the base
uses the same rule against its own previous frame (``temporal_threshold``; the reference of a point is the
value it last passed on, so slow drift is caught), and each sub-task uses the current base as reference in
the embedding and its first ``video_task_layers`` blocks and its own previous frame in the later blocks.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from densemtl.errors import ConfigError
from densemtl.models.architecture import DeploymentCost
from densemtl.models.output import ModelOutput
from densemtl.models.sharing.model import SharingModel
from densemtl.models.vit_blocks import (
    BLOCK_LINEARS,
    EMBED,
    AttentionRef,
    DenseExecutor,
    LinearRef,
    Trace,
    Weights,
    attend,
    attention_flops,
    merge_heads,
    split_heads,
)

SPARSE_BELOW = 0.1  # CSR beats a dense product on this CPU under ~10% density (measured, see docs)
MODES = ("element", "token")


def _reference_output(entry: LinearRef | AttentionRef | torch.Tensor) -> torch.Tensor:
    """The flattened output a point passed on in a reference run (a linear's ``y`` or the embedding)."""
    return entry.y if isinstance(entry, LinearRef) else entry


class WeightCorrection:
    """``dW x + db`` for tokens a sub-task takes from the base: a CSR product when ``dW`` is sparse enough."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, sparse_below: float = SPARSE_BELOW) -> None:
        self.bias = bias.contiguous()
        self.nonzero = int((weight != 0).sum())
        self.empty = self.nonzero == 0 and not bool(self.bias.any())
        self.sparse = self.nonzero < sparse_below * weight.numel()
        if self.sparse:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
                self.matrix = weight.contiguous().to_sparse_csr()
        else:
            self.matrix = weight.contiguous()
        self.flops_per_token = 2 * (self.nonzero if self.sparse else weight.numel())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.sparse:
            return (self.matrix @ x.T).T + self.bias
        return F.linear(x, self.matrix, self.bias)


class ReuseExecutor:
    """Token mode: starts every point from a reference run and recomputes only significant tokens.

    ``refs`` gives each point's reference (the base run of the same frame, or this task's previous frame),
    ``thresholds`` each point's tau, ``corrections`` the weight-delta term for linears whose reference was
    computed with other weights. ``trace`` is this run's own trace (reference inputs updated only where
    recomputed), ``flops`` the matrix-product FLOPs executed, ``recomputed[name] = (computed, total)``.
    With ``keep_attention`` False the trace holds no attention entries (no copy of the N x N probabilities),
    so it cannot serve as a later frame's reference.
    """

    def __init__(
        self, weights: Weights, refs: Trace, thresholds: dict[str, float], corrections: dict[str, WeightCorrection],
        keep_attention: bool = True,
    ) -> None:
        self.weights = weights
        self.keep_attention = keep_attention
        self.refs = refs
        self.thresholds = thresholds
        self.corrections = corrections
        self.trace: Trace = {}
        self.flops = 0
        self.recomputed: dict[str, tuple[int, int]] = {}
        self._change: dict[str, torch.Tensor] = {}

    def observe(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return x

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        ref = self.refs[EMBED]
        flat = x.reshape(-1, x.shape[-1])
        changed = (flat - ref).abs().amax(dim=1) > self.thresholds[EMBED]
        out = torch.where(changed[:, None], flat, ref)
        self.trace[EMBED] = out
        self.recomputed[EMBED] = (int(changed.sum()), flat.shape[0])
        return out.view_as(x)

    def linear(self, name: str, x: torch.Tensor) -> torch.Tensor:
        ref = self.refs[name]
        tau = self.thresholds[name]
        weight, bias = self.weights[f"{name}.weight"], self.weights[f"{name}.bias"]
        flat = x.reshape(-1, x.shape[-1])
        significant = (flat - ref.x).abs().amax(dim=1) > tau
        selected = significant.nonzero().squeeze(1)
        y, new_x = ref.y, ref.x  # copied only when something changes
        if selected.numel():
            rows = flat.index_select(0, selected)
            y = y.index_copy(0, selected, F.linear(rows, weight, bias))
            new_x = new_x.index_copy(0, selected, rows)
            self.flops += 2 * selected.numel() * weight.shape[0] * weight.shape[1]
        correction = self.corrections.get(name)
        if correction is not None and not correction.empty and selected.numel() < flat.shape[0]:
            rest = (~significant).nonzero().squeeze(1)
            delta = correction(ref.x if selected.numel() == 0 else ref.x.index_select(0, rest))
            self.flops += correction.flops_per_token * rest.numel()
            keep = (delta.abs().amax(dim=1) > tau).nonzero().squeeze(1)
            if keep.numel():
                y = y.index_add(0, rest.index_select(0, keep), delta.index_select(0, keep))
        self.recomputed[name] = (selected.numel(), flat.shape[0])
        self.trace[name] = LinearRef(new_x, y)
        if name.endswith(".qkv"):
            change = (y - ref.y).abs().amax(dim=1) if y is not ref.y else torch.zeros_like(significant, dtype=y.dtype)
            self._change[name] = change.view(x.shape[:-1])
        return y.view(*x.shape[:-1], y.shape[-1])

    def attention(self, name: str, qkv: torch.Tensor, heads: int) -> torch.Tensor:
        ref = self.refs[name]
        tau = self.thresholds[name]
        change = self._change.pop(name.replace(".attn", ".qkv"))
        batch, tokens, width = ref.out.shape
        changed = change > 0
        if not bool(changed.any()):
            self.trace[name] = ref
            self.recomputed[name] = (0, batch * tokens)
            return ref.out
        q, k, v = split_heads(qkv, heads)
        probs = ref.probs.clone() if self.keep_attention else None
        out = ref.out.clone()
        computed = 0
        for b in range(batch):
            estimate = (ref.probs[b] @ change[b]).amax(dim=0)  # change is 0 on unchanged tokens
            self.flops += 2 * heads * tokens * tokens
            rows = (changed[b] | (estimate > tau)).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            row_probs, row_out = attend(q[b][:, rows], k[b], v[b])
            if probs is not None:
                probs[b][:, rows] = row_probs
            out[b, rows] = row_out.transpose(0, 1).flatten(1)
            self.flops += 4 * rows.numel() * tokens * width
            computed += rows.numel()
        self.recomputed[name] = (computed, batch * tokens)
        if probs is not None:
            self.trace[name] = AttentionRef(probs, out)
        return out

    def share(self) -> float:
        """Share of linear-layer tokens computed."""
        linears = [value for name, value in self.recomputed.items() if not name.endswith(".attn") and name != EMBED]
        return sum(c for c, _ in linears) / max(sum(t for _, t in linears), 1)


class ElementExecutor:
    """Element mode: every point computed densely, then each output element either the reference's or the
    exact own value (``|y - y_r| >= tau``); ``flops`` counted from the kept densities (module docstring).

    ``recomputed[name] = (kept elements, total)`` per point; ``trace`` holds the values passed on.
    """

    def __init__(self, weights: Weights, refs: Trace, thresholds: dict[str, float]) -> None:
        self.weights = weights
        self.refs = refs
        self.thresholds = thresholds
        self.trace: Trace = {}
        self.flops = 0
        self.recomputed: dict[str, tuple[int, int]] = {}
        self._patch_flops = 0

    def observe(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return x

    def _threshold(self, name: str, y: torch.Tensor, dense_flops: int) -> torch.Tensor:
        ref = _reference_output(self.refs[name])
        flat = y.reshape(-1, y.shape[-1])
        kept = (flat - ref).abs() >= self.thresholds[name]
        out = torch.where(kept, flat, ref)
        count = int(kept.sum())
        self.recomputed[name] = (count, kept.numel())
        self.flops += round(dense_flops * count / kept.numel())
        return out

    def linear(self, name: str, x: torch.Tensor) -> torch.Tensor:
        weight = self.weights[f"{name}.weight"]
        y = F.linear(x, weight, self.weights[f"{name}.bias"])
        dense_flops = 2 * x.numel() * weight.shape[0]
        if name == "patch":  # thresholded (and counted) at the embedding output
            self._patch_flops = dense_flops
            return y
        out = self._threshold(name, y, dense_flops)
        self.trace[name] = LinearRef(x.reshape(-1, x.shape[-1]), out)
        return out.view_as(y)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        out = self._threshold(EMBED, x, self._patch_flops)
        self.trace[EMBED] = out
        return out.view_as(x)

    def attention(self, name: str, qkv: torch.Tensor, heads: int) -> torch.Tensor:
        out = merge_heads(F.scaled_dot_product_attention(*split_heads(qkv, heads)))
        self.flops += attention_flops(*out.shape)
        return out

    def share(self) -> float:
        """Share of thresholded output elements that are the task's own (1 for a dense run)."""
        return sum(c for c, _ in self.recomputed.values()) / max(sum(t for _, t in self.recomputed.values()), 1)


@dataclass
class FrameResult:
    """Raw outputs of every task, the traces to reuse on the next frame, and what the frame cost.

    ``recomputed[task]``: share of linear tokens computed (token mode) or of thresholded output elements
    passed on from the task's own computation (element mode); ``points[task][name]``: the same per point.
    ``reusable``: the traces can serve as a later frame's reference.
    """

    pred: dict[str, torch.Tensor]
    traces: dict[str, Trace]
    flops: dict[str, int]
    recomputed: dict[str, float] = field(default_factory=dict)
    points: dict[str, dict[str, float]] = field(default_factory=dict)
    reusable: bool = True


class SharedInference(nn.Module):
    """Inference of a trained :class:`SharingModel` reusing activations (see the module docstring).

    As a module, ``forward(image)`` returns ``{"pred": ...}`` like a model, so evaluation scores the
    deployed inference; ``images_run`` and ``flops_run`` count what it cost.

    ``threshold`` (tau between a sub-task and the base; a float or ``{point name: tau}``),
    ``temporal_threshold`` (tau between frames), ``video_task_layers`` (sub-task blocks that keep the
    current base as reference on non-key frames), ``mode`` (``element`` or ``token``).
    """

    def __init__(
        self,
        model: SharingModel,
        threshold: float | dict[str, float] = 0.15,
        temporal_threshold: float | None = None,
        video_task_layers: int | None = None,
        mode: str = "element",
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ConfigError(f"key 'sharing.inference': expected one of {', '.join(MODES)}, got {mode!r}")
        self.model = model
        self.mode = mode
        self.threshold = threshold
        self.encoder = model.encoder
        blocks = range(len(self.encoder.blocks))
        if mode == "token":
            names = [EMBED, *self.encoder.linear_names, *(f"blocks.{i}.attn" for i in blocks)]
        else:
            names = [EMBED, *(f"blocks.{i}.{kind}" for i in blocks for kind in BLOCK_LINEARS)]
        self.names = names
        self.task_tau = self._per_layer(threshold, names)
        self.time_tau = self._per_layer(
            model.sharing.temporal_threshold if temporal_threshold is None else temporal_threshold, names
        )
        self.task_layers = model.sharing.video_task_layers if video_task_layers is None else video_task_layers
        self._decoder_flops: dict[tuple, int] = {}
        self.images_run = 0
        self.flops_run = 0
        self.eval()  # this module and the wrapped model
        with torch.no_grad():
            base = {name: value.detach() for name, value in self.encoder.weights().items()}
            self.weights: dict[str, Weights] = {model.base_task: base}
            self.corrections: dict[str, dict[str, WeightCorrection]] = {}
            for task in model.sub_tasks:
                deltas = model.effective_deltas(task)
                self.weights[task] = {name: value + deltas[name] if name in deltas else value
                                      for name, value in base.items()}
                self.corrections[task] = {  # every gated set holds the linears
                    name: WeightCorrection(deltas[f"{name}.weight"], deltas[f"{name}.bias"])
                    for name in self.encoder.linear_names
                } if mode == "token" else {}

    @staticmethod
    def _per_layer(value: float | dict[str, float], names: list[str]) -> dict[str, float]:
        if isinstance(value, dict):
            unknown = sorted(set(value) - set(names))
            if unknown:
                raise ConfigError(f"thresholds for unknown layers: {', '.join(unknown)} (known: {', '.join(names)})")
            return {name: float(value.get(name, 0.0)) for name in names}
        return dict.fromkeys(names, float(value))

    @staticmethod
    def _block(name: str) -> int:
        return int(name.split(".")[1]) if name.startswith("blocks.") else -1

    def _decode(self, task: str, tokens: torch.Tensor, grid: Any, size: tuple) -> tuple[torch.Tensor, int]:
        """The task's raw output and its decoder's FLOPs (counted once per input shape, then cached)."""
        decoder = self.model.decoders[task]
        key = (task, tuple(tokens.shape), size)
        if key in self._decoder_flops:
            return decoder(tokens, grid, size)[0], self._decoder_flops[key]
        with FlopCounterMode(display=False) as counter:
            raw = decoder(tokens, grid, size)[0]
        self._decoder_flops[key] = counter.get_total_flops()
        return raw, self._decoder_flops[key]

    def _reuse(self, weights: Weights, refs: Trace, taus: dict[str, float],
               corrections: dict[str, WeightCorrection], keep_attention: bool) -> ReuseExecutor | ElementExecutor:
        if self.mode == "token":
            return ReuseExecutor(weights, refs, taus, corrections, keep_attention=keep_attention)
        return ElementExecutor(weights, refs, taus)

    @torch.no_grad()
    def dense(self, image: torch.Tensor) -> FrameResult:
        """Every task computed in full (the reference the savings are measured against; no trace kept)."""
        size = tuple(image.shape[-2:])
        pred, flops = {}, {}
        for task in self.model.tasks:
            executor = DenseExecutor(self.weights[task])
            tokens, grid = self.encoder(image, executor)
            pred[task], decoder_flops = self._decode(task, tokens, grid, size)
            flops[task] = executor.flops + decoder_flops
        return FrameResult(pred, {}, flops, dict.fromkeys(pred, 1.0), reusable=False)

    @torch.no_grad()
    def run(
        self, image: torch.Tensor, previous: FrameResult | None = None, keyframe: bool = True, for_video: bool = True
    ) -> FrameResult:
        """One frame: the base densely on a keyframe (else reusing ``previous``), sub-tasks from the base.

        ``for_video`` False skips keeping what only a next frame needs (token mode: the sub-tasks' attention
        probabilities); such a result cannot be ``previous`` of a later frame.
        """
        size = tuple(image.shape[-2:])
        base = self.model.base_task
        temporal = previous is not None and not keyframe
        if temporal and not previous.reusable:
            raise ValueError("the previous frame was run with for_video=False; it cannot be reused")
        result = FrameResult({}, {}, {}, reusable=for_video or self.mode == "element")
        if temporal:
            executor = self._reuse(self.weights[base], previous.traces[base], self.time_tau, {}, True)
        else:
            executor = DenseExecutor(self.weights[base], trace=True, trace_attention=self.mode == "token")
        self._finish(result, base, executor, image, size)
        for task in self.model.sub_tasks:
            refs, taus, corrections = {}, {}, {}
            for name in self.names:
                if temporal and self._block(name) >= self.task_layers:
                    refs[name], taus[name] = previous.traces[task][name], self.time_tau[name]
                else:
                    refs[name], taus[name] = result.traces[base][name], self.task_tau[name]
                    if name in self.corrections[task]:
                        corrections[name] = self.corrections[task][name]
            executor = self._reuse(self.weights[task], refs, taus, corrections, for_video)
            self._finish(result, task, executor, image, size)
        result.pred = {t: result.pred[t] for t in self.model.tasks}
        return result

    def _finish(self, result: FrameResult, task: str, executor: Any, image: torch.Tensor, size: tuple) -> None:
        """Run ``task``'s encoder with ``executor`` and its decoder; record outputs, trace and cost."""
        tokens, grid = self.encoder(image, executor)
        result.pred[task], decoder_flops = self._decode(task, tokens, grid, size)
        result.flops[task] = executor.flops + decoder_flops
        result.traces[task] = executor.trace
        dense = isinstance(executor, DenseExecutor)
        result.recomputed[task] = 1.0 if dense else executor.share()
        result.points[task] = {} if dense else {name: c / max(t, 1) for name, (c, t) in executor.recomputed.items()}

    def forward(self, image: torch.Tensor) -> ModelOutput:
        """``{"pred": raw outputs}`` of a batch of still images (no trace kept for a next frame)."""
        result = self.run(image, for_video=False)
        self.images_run += image.shape[0]
        self.flops_run += sum(result.flops.values())
        return {"pred": result.pred}

    def cost_report(self) -> DeploymentCost:
        """The mode, the threshold and the mean GFLOPs per image (all tasks) of the images run so far."""
        gflops = self.flops_run / max(self.images_run, 1) / 1e9
        return DeploymentCost(
            "sharing",
            {"inference": self.mode, "threshold": self.threshold, "gflops_per_image": gflops},
            f"computation sharing ({self.mode} mode) at threshold {self.threshold}: {gflops:.3f} GFLOPs per image "
            "(all tasks)",
            gflops,
        )
