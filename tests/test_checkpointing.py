"""model.gradient_checkpointing: the backbone's activations are recomputed in the backward pass, and the
gradients (and BatchNorm statistics) are those of the run without it."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from densemtl.config import ModelConfig
from densemtl.models.backbones import FAMILIES, build_backbone
from tests.conftest import TINY_ARGS, tiny_model


def _run(module: nn.Module, loss: Callable[[nn.Module], torch.Tensor]) -> tuple[dict[str, torch.Tensor], int]:
    """The gradients of ``loss(module)`` by parameter name, and the FLOPs that forward and backward counted
    (a recomputation in the backward pass adds its forward's)."""
    torch.manual_seed(1)  # stochastic depth (Swin) and gate samples draw the same in both runs
    module.zero_grad(set_to_none=True)
    with FlopCounterMode(display=False) as counter:
        loss(module).backward()
    grads = {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}
    return grads, counter.get_total_flops()


def _assert_same_training(plain: nn.Module, checkpointed: nn.Module, loss: Callable[[nn.Module], torch.Tensor]) -> None:
    grads, flops = _run(plain, loss)
    grads_ckpt, flops_ckpt = _run(checkpointed, loss)
    assert flops_ckpt > flops, "nothing was recomputed in the backward pass"
    assert grads and grads.keys() == grads_ckpt.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-5, atol=1e-5, msg=name)
    for (name, buffer), other in zip(plain.named_buffers(), checkpointed.buffers(), strict=True):
        assert torch.equal(buffer, other), f"{name}: the recomputation changed the BatchNorm statistics"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_backbone_family_gives_the_same_gradients_with_checkpointing(family: str) -> None:
    assert set(TINY_ARGS) == set(FAMILIES)
    torch.manual_seed(0)
    plain = build_backbone(ModelConfig(backbone=family, backbone_args=TINY_ARGS[family])).train()
    checkpointed = build_backbone(ModelConfig(backbone=family, backbone_args=TINY_ARGS[family],
                                              gradient_checkpointing=True)).train()
    checkpointed.load_state_dict(plain.state_dict())
    image = torch.randn(2, 3, 64, 96)
    _assert_same_training(plain, checkpointed, lambda m: sum(f.square().mean() for f in m(image)))


@pytest.mark.parametrize("phase", [0, 1, 3])
def test_the_sharing_encoder_gives_the_same_gradients_with_checkpointing(phase: int) -> None:
    """Phase 0 trains the base ViT, phase 1 the sub-tasks' deltas and gates through the frozen encoder, phase 3
    adds the activation-sharing term on activations recorded inside the checkpointed blocks."""
    plain = tiny_model(trained=False).train()
    plain.set_phase(phase)
    checkpointed = copy.deepcopy(plain)
    checkpointed.encoder.checkpointing = True
    image = torch.randn(2, 3, 32, 48)

    def loss(model: nn.Module) -> torch.Tensor:
        output = model(image)
        return sum(raw.square().mean() for raw in output["pred"].values()) + sum(output["extra_losses"].values())

    _assert_same_training(plain, checkpointed, loss)


def test_the_option_reaches_the_sharing_encoder_and_is_type_checked() -> None:
    assert tiny_model(["model.gradient_checkpointing=true"], trained=False).encoder.checkpointing
    assert not tiny_model(trained=False).encoder.checkpointing
    from densemtl.config import load_config
    from densemtl.errors import ConfigError

    with pytest.raises(ConfigError, match="model.gradient_checkpointing.*true or false"):
        load_config(None, ["model.gradient_checkpointing=2"])
