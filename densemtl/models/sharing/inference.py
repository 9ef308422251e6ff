"""Token-skipping inference of a trained :class:`~densemtl.models.sharing.model.SharingModel`: delta
activations across tasks and across video frames (the ``sharing`` architecture's deployed form).

**Across tasks.** For a linear with base input ``x_b`` and output ``y_b = W_b x_b + b_b``, the sub-task's
exact output is, with ``dx = x_s - x_b``, ``dW = W_s - W_b``, ``db = b_s - b_b``::

    y_s = W_s x_s + b_s = y_b + (dW x_b + db) + W_s dx

Per token: if ``max |dx| > tau`` the token is *recomputed*, ``y_s = W_s x_s + b_s`` on the gathered tokens
only (scattered back into a copy of ``y_b``); otherwise ``dx`` is dropped and the token keeps ``y_b`` plus
the weight-delta correction ``c = dW x_b + db`` (a CSR product when ``dW`` is sparse enough), itself kept
only where ``max |c| > tau``. So ``tau = 0`` gives the dense sub-task (a dropped ``dx`` is exactly zero,
a dropped ``c`` too) and a huge ``tau`` gives exactly the base activations (nothing recomputed, nothing
added). Attention: a query row is recomputed (against all current keys and values) when its own q/k/v
changed, or when the reference attention mass it puts on changed tokens times their largest q/k/v change
exceeds ``tau``; other rows keep the reference output. LayerNorms, GELU and residual additions run on all
tokens (element-wise, cheap); FLOPs count the matrix products actually executed.

**Across time.** On a keyframe the base runs densely and the sub-tasks as above. On other frames the base
reuses its own previous frame's trace (same rule, ``temporal_threshold``: only tokens whose input moved
are recomputed, the reference input of a token being the one it was last recomputed from, so slow drift
is caught), and each sub-task uses the current base as reference in the patch embedding and its first
``video_task_layers`` blocks and its own previous frame's trace in the later blocks.
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
from densemtl.models.vit_blocks import AttentionRef, DenseExecutor, LinearRef, Trace, Weights, attend, split_heads

SPARSE_BELOW = 0.1  # CSR beats a dense product on this CPU under ~10% density (measured, see docs)


class WeightCorrection:
    """``dW x + db`` for tokens a sub-task takes from the base: a CSR product when ``dW`` is sparse enough."""

    def __init__(self, delta: torch.Tensor, sparse_below: float = SPARSE_BELOW) -> None:
        weight = delta[:, :-1].contiguous()
        self.bias = delta[:, -1].contiguous()
        self.nonzero = int((weight != 0).sum())
        self.empty = self.nonzero == 0 and not bool(self.bias.any())
        self.sparse = self.nonzero < sparse_below * weight.numel()
        if self.sparse:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
                self.matrix = weight.to_sparse_csr()
        else:
            self.matrix = weight
        self.flops_per_token = 2 * (self.nonzero if self.sparse else weight.numel())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.sparse:
            return (self.matrix @ x.T).T + self.bias
        return F.linear(x, self.matrix, self.bias)


class ReuseExecutor:
    """Starts every linear and attention from a reference run and recomputes only significant tokens.

    ``refs`` gives each layer's reference (the base run of the same frame, or this task's previous frame),
    ``thresholds`` each layer's tau, ``corrections`` the weight-delta term for layers whose reference was
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

    def linear(self, name: str, x: torch.Tensor) -> torch.Tensor:
        ref = self.refs[name]
        tau = self.thresholds[name]
        weight, bias = self.weights[name]
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


@dataclass
class FrameResult:
    """Raw outputs of every task, the traces to reuse on the next frame, and what the frame cost."""

    pred: dict[str, torch.Tensor]
    traces: dict[str, Trace]
    flops: dict[str, int]
    recomputed: dict[str, float] = field(default_factory=dict)  # task -> share of linear tokens computed


class SharedInference(nn.Module):
    """Token-skipping inference of a trained :class:`SharingModel` (see the module docstring).

    As a module, ``forward(image)`` returns ``{"pred": ...}`` like a model, so evaluation scores the
    deployed inference; ``images_run`` and ``flops_run`` count what it cost.

    ``threshold`` (tau between a sub-task and the base; a float or ``{layer name: tau}``),
    ``temporal_threshold`` (tau between frames), ``video_task_layers`` (sub-task blocks that keep the
    current base as reference on non-key frames).
    """

    def __init__(
        self,
        model: SharingModel,
        threshold: float | dict[str, float] = 0.15,
        temporal_threshold: float | None = None,
        video_task_layers: int | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.threshold = threshold
        self.encoder = model.encoder
        names = self.encoder.linear_names + [f"blocks.{i}.attn" for i in range(len(self.encoder.blocks))]
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
            base = {name: (w.detach(), b.detach()) for name, (w, b) in self.encoder.weights().items()}
            self.weights: dict[str, Weights] = {model.base_task: base}
            self.corrections: dict[str, dict[str, WeightCorrection]] = {}
            for task in model.sub_tasks:
                deltas = model.effective_deltas(task)
                self.weights[task] = {
                    name: (base[name][0] + d[:, :-1], base[name][1] + d[:, -1]) for name, d in deltas.items()
                }
                self.corrections[task] = {name: WeightCorrection(d) for name, d in deltas.items()}

    @staticmethod
    def _per_layer(value: float | dict[str, float], names: list[str]) -> dict[str, float]:
        if isinstance(value, dict):
            unknown = sorted(set(value) - set(names))
            if unknown:
                raise ConfigError(f"thresholds for unknown layers: {', '.join(unknown)} (known: {', '.join(names)})")
            return {name: float(value.get(name, 0.0)) for name in names}
        return dict.fromkeys(names, float(value))

    def _block(self, name: str) -> int:
        return -1 if name == "patch" else int(name.split(".")[1])

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
        return FrameResult(pred, {}, flops, dict.fromkeys(pred, 1.0))

    @torch.no_grad()
    def run(
        self, image: torch.Tensor, previous: FrameResult | None = None, keyframe: bool = True, for_video: bool = True
    ) -> FrameResult:
        """One frame: the base densely on a keyframe (else reusing ``previous``), sub-tasks from the base.

        ``for_video`` False skips copying the sub-tasks' attention probabilities (a single image needs no
        trace for a next frame); such a result cannot be ``previous`` of a later frame.
        """
        size = tuple(image.shape[-2:])
        base = self.model.base_task
        temporal = previous is not None and not keyframe
        if temporal and any("blocks.0.attn" not in previous.traces[t] for t in self.model.sub_tasks):
            raise ValueError("the previous frame was run with for_video=False; it cannot be reused")
        pred, flops, traces, recomputed = {}, {}, {}, {}
        if temporal:
            executor = ReuseExecutor(self.weights[base], previous.traces[base], self.time_tau, {})
        else:
            executor = DenseExecutor(self.weights[base], trace=True)
        tokens, grid = self.encoder(image, executor)
        pred[base], decoder_flops = self._decode(base, tokens, grid, size)
        flops[base] = executor.flops + decoder_flops
        traces[base] = executor.trace
        recomputed[base] = self._share(executor)
        for task in self.model.sub_tasks:
            refs, taus, corrections = {}, {}, {}
            for name in self.names:
                if temporal and self._block(name) >= self.task_layers:
                    refs[name], taus[name] = previous.traces[task][name], self.time_tau[name]
                else:
                    refs[name], taus[name] = traces[base][name], self.task_tau[name]
                    if name in self.corrections[task]:
                        corrections[name] = self.corrections[task][name]
            executor = ReuseExecutor(self.weights[task], refs, taus, corrections, keep_attention=for_video)
            tokens, grid = self.encoder(image, executor)
            pred[task], decoder_flops = self._decode(task, tokens, grid, size)
            flops[task] = executor.flops + decoder_flops
            traces[task] = executor.trace
            recomputed[task] = self._share(executor)
        return FrameResult({t: pred[t] for t in self.model.tasks}, traces, flops, recomputed)

    def forward(self, image: torch.Tensor) -> ModelOutput:
        """``{"pred": raw outputs}`` of a batch of still images (no trace kept for a next frame)."""
        result = self.run(image, for_video=False)
        self.images_run += image.shape[0]
        self.flops_run += sum(result.flops.values())
        return {"pred": result.pred}

    def cost_report(self) -> DeploymentCost:
        """The threshold and the mean GFLOPs per image (all tasks) of the images run so far."""
        gflops = self.flops_run / max(self.images_run, 1) / 1e9
        return DeploymentCost(
            "sharing",
            {"threshold": self.threshold, "gflops_per_image": gflops},
            f"computation sharing at threshold {self.threshold}: {gflops:.3f} GFLOPs per image (all tasks)",
            gflops,
        )

    @staticmethod
    def _share(executor: DenseExecutor | ReuseExecutor) -> float:
        """Share of linear-layer tokens actually computed (1 for a dense run)."""
        if isinstance(executor, DenseExecutor):
            return 1.0
        done = sum(c for n, (c, _) in executor.recomputed.items() if not n.endswith(".attn"))
        total = sum(t for n, (_, t) in executor.recomputed.items() if not n.endswith(".attn"))
        return done / max(total, 1)
