"""Typed experiment configs: dataclasses filled from YAML files and dotted command-line overrides.

A config file holds the sections below (all optional); every value is checked against the field's
type, and unknown keys fail with the dotted key and the file named. Overrides look like
``train.lr=1e-4`` or ``data.tasks=[semseg,depth]``: the value is parsed as YAML.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NoReturn

import yaml

from densemtl.errors import ConfigError
from densemtl.registry import ARCHITECTURES, BALANCERS, DATASETS, TASKS

ACTIVATION_LAYERS = ("norm1", "qkv", "proj", "fc1", "gelu", "fc2", "norm2")  # per block, for sharing

@dataclass
class SyntheticConfig:
    """The embedded procedural scene dataset."""

    height: int = 96
    width: int = 128
    num_train: int = 400
    num_val: int = 100
    num_test: int = 100
    num_clips: int = 4
    clip_length: int = 16
    motion: Literal["camera", "slow_camera", "static_camera", "mixed"] = "camera"  # of clips and neighbours
    neighbour_offsets: list[int] = field(default_factory=list)  # training frames carry a neighbour at one of these
    seed: int = 0
    cache_dir: str | None = None  # default: $DENSEMTL_CACHE or ~/.cache/densemtl
    # {task: fraction} of training frames whose label of that task is dropped (partial labels); the same
    # frames in every epoch and run with the same seed; validation and test frames keep all their labels
    drop_labels: dict[str, float] = field(default_factory=dict)


@dataclass
class DataConfig:
    dataset: str = "synthetic"  # a row of densemtl.registry.DATASETS
    root: str | None = None
    tasks: list[str] = field(default_factory=lambda: ["semseg", "depth", "normals", "edge"])
    train_split: str = "train"
    val_split: str = "val"
    crop_size: list[int] | None = None  # (H, W) training crop; None keeps the native size
    scale_range: list[float] = field(default_factory=lambda: [1.0, 1.0])
    flip: bool = True
    batch_size: int = 8
    eval_batch_size: int = 8
    num_workers: int = 0
    pin_memory: bool = True  # page-locked batches, copied to the GPU while it computes (only with CUDA)
    persistent_workers: bool = False  # keep the workers between epochs (needs num_workers > 0)
    prefetch_factor: int | None = None  # batches each worker loads ahead (needs num_workers > 0); None: torch's 2
    on_bad_sample: Literal["error", "skip"] = "error"
    partial_labels: bool = False  # a folder dataset may lack a task's file for a sample: it trains without it
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class ModelConfig:
    arch: str = "multitask"  # a row of densemtl.registry.ARCHITECTURES
    backbone: str = "resnet-tiny"  # a family or preset of densemtl/models/backbones.py
    backbone_args: dict[str, Any] = field(default_factory=dict)  # passed to the HF config
    pretrained: str | None = None  # hub name or local folder; None = random init, no download
    feature_layers: list[int] | None = None  # for plain ViTs: which blocks feed the neck
    neck_channels: int = 64
    head_channels: int = 64
    # recompute the backbone's activations in the backward pass instead of storing them: less memory, ~30 %
    # more compute (Hugging Face blocks where the model supports it, else the whole encoder as one segment)
    gradient_checkpointing: bool = False


@dataclass
class LossConfig:
    weights: dict[str, float] = field(default_factory=dict)  # per task; missing = the task's default
    normals_loss: Literal["l1", "cosine"] = "l1"
    balancer: str = "fixed"  # a row of densemtl.registry.BALANCERS
    balancer_args: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainConfig:
    steps: int = 1000
    lr: float = 1e-3
    weight_decay: float = 1e-4
    schedule: Literal["poly", "cosine", "constant"] = "poly"
    poly_power: float = 0.9
    warmup_steps: int = 50
    grad_clip: float | None = 1.0
    amp: Literal["none", "bf16", "fp16"] = "none"
    accumulate: int = 1
    ema_decay: float = 0.0  # 0 disables the EMA of weights
    seed: int = 0
    log_every: int = 10
    eval_every: int = 250
    checkpoint_every: int = 250
    device: str = "auto"
    sync_bn: bool = True  # under DDP on GPUs: BatchNorm statistics over all ranks (SyncBN is GPU-only)
    find_unused_parameters: bool = False  # DDP: set for models whose forward skips some parameters
    compile: bool = False  # torch.compile the training forward (the first steps are slower while it compiles)
    channels_last: bool = False  # NHWC weights and images: faster convolutions on GPUs with tensor cores


@dataclass
class EvalConfig:
    boundary_max_dist: float | None = None  # fraction of the diagonal; None = the dataset's protocol
    boundary_thresholds: int | None = None  # None = the edge protocol's own; K = k/(K+1), k=1..K (quicker)
    boundary_matcher: Literal["exact", "bsds"] = "exact"
    # how soft boundary maps become SEISM's thresholded maps: HED NMS + SEISM (default), InvPT/TaskPrompter's
    # tool, or Multi-Task-Learning-PyTorch's (densemtl/metrics/edge_protocols.py)
    edge_protocol: Literal["seism-hed", "invpt", "mtlpt"] = "seism-hed"
    boundary_during_training: bool = True
    saliency_thresholds: int = 19
    # saliency's metric in delta_m: maxF (the field's tables) or MTL-PyTorch's mIoU (best of its 15 thresholds)
    delta_m_saliency: Literal["maxF", "mIoU"] = "maxF"
    # single-task baselines (run directories or result files): training and `evaluate` then report Delta-m
    baselines: list[str] = field(default_factory=list)


@dataclass
class ContrastiveConfig:
    """Cross-task contrastive regularization (training only); docs/results/contrastive.md says which
    values follow the paper and which are densemtl's."""

    enabled: bool = False
    weight: float = 0.5  # densemtl's value (the paper's was not available to us)
    loss: Literal["triplet", "infonce"] = "triplet"  # the paper trains a triplet loss; InfoNCE is an option
    mining: Literal["sampled", "batch_hard"] = "sampled"  # triplet: random positive/negative per anchor, or hardest
    margin: float = 0.3
    temperature: float = 0.1  # infonce only
    num_pixels: int = 256  # sampled per batch, shared out over its images
    projector_dim: int = 64
    depth_positive: float = 0.05  # relative depth difference under which two pixels are positives
    depth_negative: float = 0.2  # and over which they are negatives
    normals_positive_deg: float = 10.0
    normals_negative_deg: float = 30.0
    seed: int | None = None  # source draws and pixel sampling; None = torch.initial_seed() when built


@dataclass
class MTCPConfig:
    """Multi-task coherence and prioritization (cross-task fusion, trace-back, deep supervision).

    ``official`` = the layout of MT-CP's released code (docs/results/mtcp.md); the others are densemtl's
    earlier variants, kept as options.
    """

    cfm: Literal["official", "bounded"] = "official"
    traceback: Literal["official", "residual"] = "official"
    # where the trace-back heads' losses go: ``official`` adds them outside the task and balancer
    # weighting (as the released code does), ``in_task`` inside each task's loss
    deep_supervision: Literal["official", "in_task"] = "official"
    attention_size: int | None = None  # CFM keys/values pooled to at most this many cells per side; None = full
    consistency_weight: float = 0.0
    traceback_weight: float = 0.5  # per deep-supervision head


@dataclass
class SharingConfig:
    """Computation sharing between a base task and sub-tasks, across tasks and video frames.

    Defaults follow the released code of Shoouri et al. where it is cheap to (gate temperature 1, log-alpha
    initialised at 5, a scalar gate per tensor beside the per-element gates, every encoder tensor gated,
    per-element output-delta inference); ``docs/results/sharing.md`` lists every remaining difference.
    """

    base_task: str = "semseg"
    l0_weight: float | dict[str, float] = 1e-4  # x expected non-zero gates (a sum); one value or one per sub-task
    activation_weight: float | dict[str, float] = 0.5  # one value or one per sub-task
    activation_reduction: Literal["mean", "sum"] = "mean"  # of |A_sub - A_base| per layer (code: sum)
    activation_layers: list[str] = field(default_factory=lambda: ["norm1", "qkv", "proj", "fc1", "gelu", "fc2"])
    inference: Literal["element", "token"] = "element"  # output-delta elements (code) or whole tokens
    threshold: float = 0.15
    keyframe_interval: int = 4
    temporal_threshold: float = 0.15
    temporal_weight: float = 0.0  # x sum over activation_layers of |A(frame) - A(neighbour, detached)|
    temporal_source: Literal["neighbour", "shift"] = "neighbour"  # a real neighbouring frame, or a shifted copy
    temporal_shift: int = 4  # pixels of the shifted copy (temporal_source: shift)
    base_temporal_steps: int = 0  # an extra base phase with the temporal term, after the base phase
    phase_steps: list[int] = field(default_factory=lambda: [400, 300, 150, 150])
    gated: Literal["all", "linears"] = "all"  # which encoder tensors get a gated delta (code: all)
    tensor_gates: bool = True  # a scalar gate per tensor beside the per-element gates (code: yes)
    gate_init: float = 5.0  # initial log-alpha (code: 5; P(z > 0) ~ 0.99)
    gate_temperature: float = 1.0  # of the hard-concrete samples (code: 1; Louizos et al.: 2/3)
    gate_scale: float = 50.0  # log_alpha = gate_scale * raw: the gates' learning-rate multiplier
    video_task_layers: int = 2  # sub-task blocks using the current base (not the previous frame) on video


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    contrastive: ContrastiveConfig = field(default_factory=ContrastiveConfig)
    mtcp: MTCPConfig = field(default_factory=MTCPConfig)
    sharing: SharingConfig = field(default_factory=SharingConfig)
    name: str = "experiment"
    out_dir: str = "runs/experiment"


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _error(key: str, source: str, why: str) -> ConfigError:
    return ConfigError(f"{source}: key '{key}': {why}")


def _convert(tp: Any, value: Any, key: str, source: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and return it converted (int -> float, list -> dc)."""
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        converter = _convert_section
    else:
        converter = _BY_ORIGIN.get(typing.get_origin(tp)) or _BY_TYPE.get(tp)
    if converter is None:
        raise _error(key, source, f"unsupported field type {_type_name(tp)}")
    return converter(tp, value, key, source)


def _convert_union(tp: Any, value: Any, key: str, source: str) -> Any:
    """The first member type that takes ``value`` (``None`` for an optional field)."""
    args = typing.get_args(tp)
    if value is None and type(None) in args:
        return None
    for arg in args:
        if arg is type(None):
            continue
        try:
            return _convert(arg, value, key, source)
        except ConfigError:
            continue
    raise _error(key, source, f"expected {_type_name(tp)}, got {value!r}")


def _convert_literal(tp: Any, value: Any, key: str, source: str) -> Any:
    choices = typing.get_args(tp)
    if value not in choices:
        raise _error(key, source, f"expected one of {', '.join(map(str, choices))}, got {value!r}")
    return value


def _convert_section(tp: Any, value: Any, key: str, source: str) -> Any:
    if not isinstance(value, dict):
        raise _error(key, source, f"expected a mapping, got {value!r}")
    return _build(tp, value, key, source)


def _convert_list(tp: Any, value: Any, key: str, source: str) -> list[Any]:
    if not isinstance(value, (list, tuple)):
        raise _error(key, source, f"expected a list, got {value!r}")
    (item,) = typing.get_args(tp)
    return [_convert(item, v, f"{key}[{i}]", source) for i, v in enumerate(value)]


def _convert_dict(tp: Any, value: Any, key: str, source: str) -> dict[Any, Any]:
    if not isinstance(value, dict):
        raise _error(key, source, f"expected a mapping, got {value!r}")
    key_type, value_type = typing.get_args(tp)
    return {_convert(key_type, k, key, source): _convert(value_type, v, f"{key}.{k}", source) for k, v in value.items()}


def _convert_float(tp: Any, value: Any, key: str, source: str) -> float:
    """A number; a string too when it parses (YAML 1.1 reads '1e-4', without a dot, as a string)."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _error(key, source, f"expected a number, got {value!r}")
    return float(value)


_EXPECTED = {int: "an integer", bool: "true or false", str: "a string"}


def _convert_exact(tp: Any, value: Any, key: str, source: str) -> Any:
    """int, bool and str values are taken as they are (an int field refuses true and false)."""
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise _error(key, source, f"expected {_EXPECTED[tp]}, got {value!r}")
    return value


_BY_ORIGIN = {
    typing.Union: _convert_union,
    types.UnionType: _convert_union,
    Literal: _convert_literal,
    list: _convert_list,
    dict: _convert_dict,
}
_BY_TYPE = {float: _convert_float, int: _convert_exact, bool: _convert_exact, str: _convert_exact}


def _build(cls: type, data: dict[str, Any], prefix: str, source: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            known = ", ".join(sorted(names))
            raise ConfigError(f"{source}: unknown key '{dotted}' (known keys here: {known})")
        kwargs[key] = _convert(hints[key], value, dotted, source)
    return cls(**kwargs)


def to_dict(config: Any) -> dict[str, Any]:
    """The config as plain data (for YAML dumps, checkpoints and result files)."""
    return dataclasses.asdict(config)


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    node = data
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{dotted}': '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn ``["train.lr=1e-4", "data.tasks=[semseg,depth]"]`` into a nested dict (values parsed as YAML)."""
    data: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}': expected key=value, e.g. train.lr=1e-4")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError as err:
            raise ConfigError(f"override '{item}': value is not valid YAML ({err})") from None
        _set_dotted(data, key.strip(), value)
    return data


def merge_dicts(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``update`` laid over ``base``, recursively for nested sections."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_dicts(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_yaml(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a config file, following an optional ``base: other.yaml`` key (relative to the file).

    ``_chain`` holds the files that led here, so a file that is its own base (through others) is named.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    if path.resolve() in _chain:
        cycle = " -> ".join(str(link) for link in (*_chain, path.resolve()))
        raise ConfigError(f"{path}: 'base:' files form a cycle: {cycle}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    base = data.pop("base", None)
    if base is not None:
        if not isinstance(base, str):
            raise ConfigError(f"{path}: key 'base': expected a file name, got {base!r}")
        data = merge_dicts(read_yaml(path.parent / base, (*_chain, path.resolve())), data)
    return data


def from_dict(data: dict[str, Any], source: str = "<config>") -> Config:
    config = _build(Config, data, "", source)
    validate(config, source)
    return config


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (or the defaults when ``path`` is None) and apply dotted overrides."""
    data = read_yaml(path) if path is not None else {}
    source = str(path) if path is not None else "<defaults>"
    if overrides:
        data = merge_dicts(data, parse_overrides(overrides))
        source += " + overrides"
    return from_dict(data, source)


_Fail = Callable[[str, str], NoReturn]  # raises the ConfigError naming the key and the file


@dataclass(frozen=True)
class Bounds:
    """The valid range of a numeric option; ``open_low`` / ``open_high`` exclude the bound itself."""

    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False

    def admits(self, value: float) -> bool:
        above = self.low is None or value > self.low or (value == self.low and not self.open_low)
        below = self.high is None or value < self.high or (value == self.high and not self.open_high)
        return above and below

    def __str__(self) -> str:
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.open_low else '['}{self.low}, {self.high}{')' if self.open_high else ']'}"
        if self.low is not None:
            return f"{'>' if self.open_low else '>='} {self.low}"
        if self.high is not None:
            return f"{'<' if self.open_high else '<='} {self.high}"
        return "a finite number"


POSITIVE = Bounds(0, open_low=True)
AT_LEAST_ONE = Bounds(1)
NON_NEGATIVE = Bounds(0)
FINITE = Bounds()

# The range of every numeric field, by dotted key (lists and mappings: of each item). A numeric field
# without a row here fails tests/test_config.py, so a new option cannot skip its check.
RANGES: dict[str, Bounds] = {
    "data.synthetic.height": AT_LEAST_ONE,
    "data.synthetic.width": AT_LEAST_ONE,
    "data.synthetic.num_train": NON_NEGATIVE,
    "data.synthetic.num_val": NON_NEGATIVE,
    "data.synthetic.num_test": NON_NEGATIVE,
    "data.synthetic.num_clips": NON_NEGATIVE,
    "data.synthetic.clip_length": AT_LEAST_ONE,
    "data.synthetic.seed": NON_NEGATIVE,
    "data.synthetic.neighbour_offsets": FINITE,  # frame offsets, either sign (distinct and non-zero: checked apart)
    "data.synthetic.drop_labels": Bounds(0, 1),  # the share of each task's labels dropped
    "data.crop_size": AT_LEAST_ONE,
    "data.scale_range": POSITIVE,
    "data.batch_size": AT_LEAST_ONE,
    "data.eval_batch_size": AT_LEAST_ONE,
    "data.num_workers": NON_NEGATIVE,
    "data.prefetch_factor": AT_LEAST_ONE,
    "model.feature_layers": AT_LEAST_ONE,  # 1-based block indices
    "model.neck_channels": AT_LEAST_ONE,
    "model.head_channels": AT_LEAST_ONE,
    "loss.weights": NON_NEGATIVE,
    "train.steps": AT_LEAST_ONE,
    "train.lr": POSITIVE,
    "train.weight_decay": NON_NEGATIVE,
    "train.poly_power": NON_NEGATIVE,
    "train.warmup_steps": NON_NEGATIVE,
    "train.grad_clip": POSITIVE,  # or null: no clipping
    "train.accumulate": AT_LEAST_ONE,
    "train.ema_decay": Bounds(0, 1, open_high=True),
    "train.seed": NON_NEGATIVE,
    "train.log_every": AT_LEAST_ONE,
    "train.eval_every": AT_LEAST_ONE,
    "train.checkpoint_every": AT_LEAST_ONE,
    "eval.boundary_max_dist": Bounds(0, 1, open_low=True),
    "eval.boundary_thresholds": AT_LEAST_ONE,
    "eval.saliency_thresholds": AT_LEAST_ONE,
    "contrastive.weight": NON_NEGATIVE,
    "contrastive.margin": NON_NEGATIVE,
    "contrastive.temperature": POSITIVE,
    "contrastive.num_pixels": Bounds(2),
    "contrastive.projector_dim": AT_LEAST_ONE,
    "contrastive.depth_positive": NON_NEGATIVE,
    "contrastive.depth_negative": NON_NEGATIVE,
    "contrastive.normals_positive_deg": Bounds(0, 180),
    "contrastive.normals_negative_deg": Bounds(0, 180),
    "contrastive.seed": NON_NEGATIVE,
    "mtcp.attention_size": AT_LEAST_ONE,
    "mtcp.consistency_weight": NON_NEGATIVE,
    "mtcp.traceback_weight": NON_NEGATIVE,
    "sharing.l0_weight": NON_NEGATIVE,
    "sharing.activation_weight": NON_NEGATIVE,
    "sharing.threshold": NON_NEGATIVE,
    "sharing.keyframe_interval": AT_LEAST_ONE,
    "sharing.temporal_threshold": NON_NEGATIVE,
    "sharing.temporal_weight": NON_NEGATIVE,
    "sharing.phase_steps": NON_NEGATIVE,
    "sharing.gate_init": FINITE,  # a log-alpha: any real number
    "sharing.gate_temperature": POSITIVE,
    "sharing.gate_scale": POSITIVE,
    "sharing.base_temporal_steps": NON_NEGATIVE,
    "sharing.temporal_shift": NON_NEGATIVE,
    "sharing.video_task_layers": NON_NEGATIVE,
}
# Pairs of options whose first may not exceed the second.
ORDERED: tuple[tuple[str, str], ...] = (
    ("contrastive.depth_positive", "contrastive.depth_negative"),
    ("contrastive.normals_positive_deg", "contrastive.normals_negative_deg"),
)


def _get_dotted(config: Any, key: str) -> Any:
    for part in key.split("."):
        config = getattr(config, part)
    return config


def _numbers(key: str, value: Any) -> list[tuple[str, float]]:
    """``(dotted key, number)`` for a number, the items of a list or the values of a mapping (None: none)."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return []
    if isinstance(value, (int, float)):
        return [(key, value)]
    if isinstance(value, (list, tuple)):
        return [pair for index, item in enumerate(value) for pair in _numbers(f"{key}[{index}]", item)]
    if isinstance(value, dict):
        return [pair for name, item in value.items() for pair in _numbers(f"{key}.{name}", item)]
    return []


def validate(config: Config, source: str = "<config>") -> None:
    """Checks on values (beyond types) that would otherwise fail deep inside training.

    Names are checked against the registry tables without importing the parts; rules that belong to one
    dataset or architecture are checked by that part when it is built (``build_dataset``, ``build_model``).
    """
    def fail(key: str, why: str) -> NoReturn:
        raise ConfigError(f"{source}: key '{key}': {why}")

    for registry, name in ((DATASETS, config.data.dataset), (ARCHITECTURES, config.model.arch),
                           (BALANCERS, config.loss.balancer)):
        registry.check(name, source)
    for check in (_check_tasks, _check_ranges, _check_sizes, _check_sharing, _check_partial_labels,
                  _check_loader):
        check(config, fail)


def _check_tasks(config: Config, fail: _Fail) -> None:
    if not config.data.tasks:
        fail("data.tasks", "at least one task is needed")
    for name in config.data.tasks:
        if name not in TASKS:
            fail("data.tasks", f"unknown task '{name}' (known: {TASKS.known()})")
    if len(set(config.data.tasks)) != len(config.data.tasks):
        fail("data.tasks", "a task is listed twice")
    for name in config.loss.weights:
        if name not in TASKS:
            fail(f"loss.weights.{name}", f"unknown task (known: {TASKS.known()})")


def _check_sizes(config: Config, fail: _Fail) -> None:
    if config.data.crop_size is not None and len(config.data.crop_size) != 2:
        fail("data.crop_size", "expected [height, width]")
    scale = config.data.scale_range
    if len(scale) != 2 or scale[0] > scale[1]:
        fail("data.scale_range", "expected [min, max] with min <= max")


def _check_loader(config: Config, fail: _Fail) -> None:
    """Options of the data worker processes refused when there are none (torch would fail at the first batch)."""
    if config.data.num_workers == 0:
        if config.data.persistent_workers:
            fail("data.persistent_workers", "needs data.num_workers > 0")
        if config.data.prefetch_factor is not None:
            fail("data.prefetch_factor", "needs data.num_workers > 0")


def _check_ranges(config: Config, fail: _Fail) -> None:
    """Every number of the config within its field's :data:`RANGES` entry (NaN and infinities never pass)."""
    for key, bounds in RANGES.items():
        for item_key, value in _numbers(key, _get_dotted(config, key)):
            if not (math.isfinite(value) and bounds.admits(value)):
                fail(item_key, f"must be {bounds}, got {value}")
    for key in ORDERED:
        low, high = (_get_dotted(config, name) for name in key)
        if low > high:
            fail(key[0], f"must not exceed {key[1]} ({high}), got {low}")
    for key in ("model.backbone_args", "loss.balancer_args"):
        for item_key, value in _numbers(key, _get_dotted(config, key)):
            if not math.isfinite(value):
                fail(item_key, f"must be a finite number, got {value}")


def _check_sharing(config: Config, fail: _Fail) -> None:
    """What :data:`RANGES` cannot say about the sharing options: known activation layers, distinct offsets."""
    unknown = sorted(set(config.sharing.activation_layers) - set(ACTIVATION_LAYERS))
    if unknown:
        fail("sharing.activation_layers", f"unknown layers {unknown} (known: {', '.join(ACTIVATION_LAYERS)})")
    offsets = config.data.synthetic.neighbour_offsets
    if 0 in offsets or len(set(offsets)) != len(offsets):
        fail("data.synthetic.neighbour_offsets", f"expected distinct non-zero frame offsets, got {offsets}")


def _check_partial_labels(config: Config, fail: _Fail) -> None:
    """``data.synthetic.drop_labels`` names tasks of the run (its fractions are checked by :data:`RANGES`)."""
    for name in config.data.synthetic.drop_labels:
        if name not in config.data.tasks:
            fail(f"data.synthetic.drop_labels.{name}", f"not a trained task ({', '.join(config.data.tasks)})")
