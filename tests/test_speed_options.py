"""Speed options change nothing but speed: train.compile, train.channels_last and the DataLoader options
(data.pin_memory, data.persistent_workers, data.prefetch_factor) give the results of a run without them."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest
import torch

from densemtl.config import load_config
from densemtl.data.base import loader_options
from densemtl.errors import ConfigError
from tests.conftest import GroupNormNet, make_trainer, tiny_config

STEP = ["data.tasks=[semseg,depth]", "train.steps=2", "train.warmup_steps=0", "train.lr=1e-4", "train.grad_clip=null"]


def _one_step(tmp_path: Path, name: str, *overrides: str, **kwargs: Any) -> tuple[dict[str, float], dict, Any]:
    """The figures and gradients of a first training step, and the trainer."""
    config = tiny_config(tmp_path, *STEP, *overrides)
    trainer = make_trainer(config, tmp_path / name, **kwargs)
    figures = {k: float(v) for k, v in trainer.train_step().items()}
    grads = {name: p.grad.clone() for name, p in trainer.model.named_parameters() if p.grad is not None}
    return figures, grads, trainer


def _assert_same(plain: tuple, other: tuple) -> None:
    """Same losses, gradient norm and gradients (to float rounding: the kernels sum in another order, so
    gradients agree to 1e-4 of their tensor's largest entry)."""
    assert plain[0].keys() == other[0].keys() and plain[1].keys() == other[1].keys() and plain[1]
    for key, value in plain[0].items():
        assert other[0][key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    for name, grad in plain[1].items():
        torch.testing.assert_close(other[1][name], grad, rtol=1e-4, atol=1e-4 * float(grad.abs().max()), msg=name)


def test_compiled_training_step_equals_the_eager_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Dynamo captures the model and AOTAutograd its backward (the ``aot_eager`` backend: no C++ compiler, seconds
    on a CPU; the default inductor backend runs in the cuda-marked tests), here with activation checkpointing and
    channels-last too: the same step, and the BatchNorm statistics updated once."""
    plain = _one_step(tmp_path, "eager")
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    compiled = _one_step(tmp_path, "compiled", "train.compile=true", "model.gradient_checkpointing=true",
                         "train.channels_last=true")
    assert isinstance(compiled[2].forward_model, torch._dynamo.eval_frame.OptimizedModule)
    assert compiled[2].forward_model is not compiled[2].model  # checkpoints keep the plain module's names
    assert compiled[2].model.backbone.checkpoint_whole
    _assert_same(plain, compiled)
    statistics = {k: v for k, v in plain[2].model.state_dict().items() if "running" in k or "num_batches" in k}
    assert statistics
    for name, value in statistics.items():
        torch.testing.assert_close(compiled[2].model.state_dict()[name], value, rtol=1e-4, atol=1e-6, msg=name)


def test_channels_last_training_step_equals_the_contiguous_one(tmp_path: Path) -> None:
    """The convolutional CPU backbone (BatchNorm included): weights and images in NHWC, same figures."""
    plain = _one_step(tmp_path, "nchw")
    nhwc = _one_step(tmp_path, "nhwc", "train.channels_last=true")
    kernel = nhwc[2].model.backbone.model.embedder.embedder.convolution.weight
    assert kernel.is_contiguous(memory_format=torch.channels_last) and not kernel.is_contiguous()
    _assert_same(plain, nhwc)


def test_loader_options_give_the_same_batches_across_epochs(tmp_path: Path) -> None:
    """Persistent workers that prefetch still see each new epoch's augmentation: batches over three epochs
    equal those loaded in the main process."""
    augment = ["data.scale_range=[1.0,1.5]", "data.flip=true"]
    batches = {}
    for name, options in {"main": [], "workers": ["data.num_workers=2", "data.persistent_workers=true",
                                                  "data.prefetch_factor=3", "data.pin_memory=true"]}.items():
        config = tiny_config(tmp_path, *augment, *options)
        trainer = make_trainer(config, tmp_path / name, GroupNormNet)
        batches[name] = [trainer._next_batch() for _ in range(7)]  # 3 batches per epoch
        assert trainer.epoch == 2
    assert not torch.equal(batches["main"][0]["image"], batches["main"][3]["image"])  # epochs differ
    for step, (one, other) in enumerate(zip(batches["main"], batches["workers"], strict=True)):
        for key in ("image", "semseg", "depth"):
            assert torch.equal(one[key], other[key]), f"batch {step}: {key}"


def test_loader_options_follow_the_config_and_the_device() -> None:
    config = load_config(None, ["data.num_workers=3", "data.persistent_workers=true", "data.prefetch_factor=5"])
    assert loader_options(config.data, torch.device("cuda")) == {
        "num_workers": 3, "pin_memory": True, "persistent_workers": True, "prefetch_factor": 5}
    assert loader_options(config.data, torch.device("cpu"))["pin_memory"] is False  # pinning is for GPU copies
    no_pinning = load_config(None, ["data.pin_memory=false"])
    assert loader_options(no_pinning.data, torch.device("cuda")) == {"num_workers": 0, "pin_memory": False}


@pytest.mark.parametrize("override, needle", [
    ("data.persistent_workers=true", "'data.persistent_workers': needs data.num_workers > 0"),
    ("data.prefetch_factor=4", "'data.prefetch_factor': needs data.num_workers > 0"),
    ("train.compile=2", "'train.compile': expected true or false"),
])
def test_worker_options_without_workers_are_refused(override: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        load_config(None, [override])
