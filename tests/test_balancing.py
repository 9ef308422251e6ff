"""Loss balancers: the weights they report are the ones the back-propagated total carries."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from densemtl.config import LossConfig
from densemtl.errors import ConfigError
from densemtl.losses.balancers import build_balancer
from densemtl.losses.balancers.base import Balancer
from densemtl.registry import BALANCERS

TASKS = ["semseg", "depth", "edge"]


def _config(balancer: str, **args) -> LossConfig:
    return LossConfig(balancer=balancer, balancer_args=args)


def _scripted(balancer, values: list[list[float]], start_step: int = 0) -> dict[str, float]:
    """Feed constant losses (one list per step) and return the weights of the last call."""
    weights = {}
    for i, row in enumerate(values):
        losses = {t: torch.tensor(v) for t, v in zip(TASKS, row, strict=True)}
        _, weights = balancer.combine(losses, start_step + i)
    return weights


def test_unknown_balancer_names_key_and_known():
    with pytest.raises(ConfigError) as err:
        build_balancer(_config("nope"), TASKS)
    message = str(err.value)
    assert "loss.balancer" in message and "nope" in message
    for name in ("fixed", "uncertainty", "dwa", "gradnorm", "lps"):
        assert name in message


def test_bad_args_and_weights_are_config_errors():
    with pytest.raises(ConfigError, match="loss.balancer_args.speed"):
        build_balancer(_config("lps", speed=2), TASKS)
    with pytest.raises(ConfigError, match="loss.balancer_args.window"):
        build_balancer(_config("lps", window=2.5), TASKS)
    with pytest.raises(ConfigError, match="loss.weights"):
        build_balancer(LossConfig(weights={"saliency": 1.0}), TASKS)


def test_fixed_uses_task_defaults_and_overrides():
    _, weights = build_balancer(LossConfig(), TASKS).combine({t: torch.tensor(1.0) for t in TASKS}, 0)
    assert weights == {"semseg": 1.0, "depth": 1.0, "edge": 50.0}
    config = LossConfig(weights={"edge": 5.0})
    total, weights = build_balancer(config, TASKS).combine({t: torch.tensor(2.0) for t in TASKS}, 0)
    assert weights["edge"] == 5.0 and total.item() == pytest.approx(2.0 * (1 + 1 + 5))


def test_window_defaults_to_engine_epoch():
    assert build_balancer(_config("lps"), TASKS, steps_per_epoch=7).window == 7
    assert build_balancer(_config("lps", window=3), TASKS, steps_per_epoch=7).window == 3


def _perturb(balancer) -> None:
    """Move every scheme's weights away from uniform so the test can tell them apart."""
    with torch.no_grad():
        if hasattr(balancer, "log_vars"):
            balancer.log_vars.copy_(torch.tensor([0.5, -1.0, 0.2]))
        if hasattr(balancer, "task_weights"):
            balancer.task_weights.copy_(torch.tensor([0.5, 2.0, 0.5]))
        if hasattr(balancer, "weights") and isinstance(balancer.weights, torch.Tensor):
            balancer.weights.copy_(torch.tensor([0.3, 2.2, 0.5]))


@pytest.mark.parametrize("name", sorted(BALANCERS))
def test_weights_act_on_the_backpropagated_gradient(name):
    """Engine path: backward() on the total gives each head w_t times its own loss gradient."""
    torch.manual_seed(0)
    shared = nn.Linear(4, 4)
    heads = nn.ModuleDict({t: nn.Linear(4, 1) for t in TASKS})
    x = torch.randn(8, 4)
    targets = {t: torch.randn(8, 1) for t in TASKS}
    balancer = build_balancer(LossConfig(balancer=name, weights={"edge": 3.0}), TASKS)
    _perturb(balancer)

    def losses():
        feature = torch.relu(shared(x))
        return {t: ((heads[t](feature) - targets[t]) ** 2).mean() for t in TASKS}

    reference = {}
    values = {}
    for t in TASKS:
        heads.zero_grad()
        loss = losses()[t]
        loss.backward()
        reference[t] = heads[t].weight.grad.clone()
        values[t] = loss.item()
    heads.zero_grad()
    total, weights = balancer.combine(losses(), step=0, shared_parameters=list(shared.parameters()))
    total.backward()
    assert len({round(w, 6) for w in weights.values()}) > 1
    for t in TASKS:
        factor = weights[t]
        if name == "lps":  # log projection: d log(1 + b L) = b dL / (1 + b L)
            base = balancer.base[TASKS.index(t)].item()
            factor *= base / (1 + base * values[t])
        torch.testing.assert_close(heads[t].weight.grad, factor * reference[t], rtol=1e-4, atol=1e-7)


# the hand-computed case: window means of three tasks over three windows (base weights 1, no projection)
LPS_HISTORY = [[2.0, 1.0, 0.5], [1.0, 0.9, 0.25], [0.8, 0.85, 0.2]]


def test_lps_follows_the_released_schedule_on_a_hand_computed_case():
    balancer = build_balancer(_config("lps", window=1, projection="none", spread=7.5, floor="none"), TASKS)
    balancer.base.fill_(1.0)
    # first window: the configured weights
    assert _scripted(balancer, LPS_HISTORY[:1]) == pytest.approx(dict.fromkeys(TASKS, 1.0))
    # after it: L_tot / L_t = 3.5 / (2, 1, 0.5), no spread
    weights = _scripted(balancer, LPS_HISTORY[1:2], start_step=1)
    assert list(weights.values()) == pytest.approx([1.75, 3.5, 7.0])
    # after the next: ratios (0.5, 0.9, 0.5) / (2.15 / 3.5), spread 7.5 about their mean 1.031008
    weights = _scripted(balancer, LPS_HISTORY[2:3], start_step=2)
    assert list(weights.values()) == pytest.approx([-0.596899, 4.286822, -0.596899], abs=1e-6)
    # the third ratio (0.929730, 1.097598, 0.929730), spread 7.5; nothing renormalised
    weights = _scripted(balancer, [[0.8, 0.85, 0.2]], start_step=3)
    assert list(weights.values()) == pytest.approx([0.566016, 1.825025, 0.566016], abs=1e-6)


def test_lps_floor_and_options_on_the_same_case():
    def weights_after(**args) -> list[float]:
        balancer = build_balancer(_config("lps", window=1, projection="none", **args), TASKS)
        balancer.base.fill_(1.0)
        return list(_scripted(balancer, LPS_HISTORY).values())

    # the default floor raises the two negative weights to min_weight, the third is unchanged
    assert weights_after(spread=7.5) == pytest.approx([0.01, 4.286822, 0.01], abs=1e-6)
    assert weights_after(spread=7.5, min_weight=0.1) == pytest.approx([0.1, 4.286822, 0.1], abs=1e-6)
    assert weights_after(spread=1.6) == pytest.approx([0.683721, 1.725581, 0.683721], abs=1e-6)
    floored = torch.tensor([0.01, 4.286822, 0.01])
    assert weights_after(spread=7.5, normalize="sum") == pytest.approx((floored * 3 / floored.sum()).tolist())
    # spread 0: every task the same weight after the second window (the mean ratio)
    assert weights_after(spread=0.0) == pytest.approx([1.031008] * 3, abs=1e-6)


def test_lps_log_projection_is_the_statistic_and_the_term():
    balancer = build_balancer(_config("lps", window=1), TASKS)
    losses = {"semseg": torch.tensor(2.0), "depth": torch.tensor(0.5), "edge": torch.tensor(0.01)}
    total, _ = balancer.combine(losses, 0)
    projected = [math.log1p(2.0), math.log1p(0.5), math.log1p(50 * 0.01)]  # edge's base weight is 50
    assert total.item() == pytest.approx(sum(projected), rel=1e-5)
    _, weights = balancer.combine(losses, 1)
    assert list(weights.values()) == pytest.approx([sum(projected) / p for p in projected], rel=1e-5)


def test_lps_window_longer_than_the_run_keeps_the_configured_weights():
    balancer = build_balancer(_config("lps", window=1000, spread=7.5), TASKS)
    for step, scale in enumerate([1.0, 0.5, 0.9, 0.2]):  # losses falling at very different rates
        losses = {"semseg": torch.tensor(2.0 * scale), "depth": torch.tensor(0.5), "edge": torch.tensor(0.01 / scale)}
        _, weights = balancer.combine(losses, step)
        assert weights == pytest.approx(dict.fromkeys(TASKS, 1.0))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"spread": -1.0}, "spread"), ({"spread": float("nan")}, "spread"), ({"min_weight": 0.0}, "min_weight"),
        ({"min_weight": float("inf")}, "min_weight"), ({"floor": "relative"}, "floor"),
        ({"normalize": "mean"}, "normalize"), ({"projection": "sqrt"}, "projection"),
    ],
)
def test_lps_bad_options_are_config_errors(args, message):
    with pytest.raises(ConfigError, match=f"loss.balancer_args.{message}"):
        build_balancer(_config("lps", **args), TASKS)


def test_dwa_formula():
    balancer = build_balancer(_config("dwa", window=1, temperature=2.0), TASKS)
    balancer.base.fill_(1.0)
    weights = _scripted(balancer, [[1.0, 1.0, 1.0], [0.5, 1.0, 0.8], [0.4, 1.0, 0.8]])
    ratio = torch.tensor([0.5, 1.0, 0.8])
    expected = 3 * torch.softmax(ratio / 2.0, dim=0)
    assert list(weights.values()) == pytest.approx(expected.tolist(), rel=1e-5)


@pytest.mark.parametrize("name", ["lps", "dwa"])
def test_state_dict_resumes_exactly(name):
    history = [[2.0, 1.0, 0.5], [1.5, 1.0, 0.4], [1.0, 1.0, 0.3], [0.8, 0.9, 0.3], [0.6, 0.9, 0.2]]
    straight = build_balancer(_config(name, window=1), TASKS)
    full = _scripted(straight, history)
    first = build_balancer(_config(name, window=1), TASKS)
    _scripted(first, history[:3])
    resumed = build_balancer(_config(name, window=1), TASKS)
    resumed.load_state_dict(first.state_dict())
    assert _scripted(resumed, history[3:], start_step=3) == pytest.approx(full)
    assert full != pytest.approx({t: full["semseg"] for t in TASKS})


def test_uncertainty_log_variances_learn():
    balancer = build_balancer(_config("uncertainty"), TASKS)
    optimizer = torch.optim.SGD(balancer.parameters(), lr=0.1)
    losses = {"semseg": torch.tensor(5.0), "depth": torch.tensor(0.1), "edge": torch.tensor(0.02)}
    total, _ = balancer.combine(losses, 0)
    total.backward()
    optimizer.step()
    _, weights = balancer.combine(losses, 1)
    # the task with the largest weighted loss (semseg 5 vs depth 0.1, edge 50 * 0.02) is down-weighted
    assert weights["semseg"] < 1.0 and weights["depth"] > 1.0


def test_gradnorm_needs_shared_parameters_and_equalises():
    balancer = build_balancer(LossConfig(balancer="gradnorm", weights={t: 1.0 for t in TASKS}), TASKS)
    with pytest.raises(ConfigError, match="shared"):
        balancer.combine({t: torch.tensor(1.0, requires_grad=True) for t in TASKS}, 0)
    shared = nn.Parameter(torch.ones(3))
    scale = torch.tensor([1.0, 4.0, 1.0])  # depth's gradient on the shared layer is 4x larger
    optimizer = torch.optim.SGD(balancer.parameters(), lr=0.05)
    for step in range(20):
        out = shared * scale
        losses = {t: out[i] ** 2 / 2 for i, t in enumerate(TASKS)}
        optimizer.zero_grad()
        total, weights = balancer.combine(losses, step, [shared])
        total.backward()
        optimizer.step()
    assert weights["depth"] < weights["semseg"] and sum(weights.values()) == pytest.approx(3.0, rel=1e-4)


def test_balancer_params_in_state_dict():
    names = set(build_balancer(_config("gradnorm"), TASKS).state_dict())
    assert {"task_weights", "initial_losses", "started"} <= names
    assert "log_vars" in build_balancer(_config("uncertainty"), TASKS).state_dict()


@pytest.mark.parametrize("placement", ["official", "in_task"])
@pytest.mark.parametrize("name", ["lps", "dwa", "uncertainty"])
def test_engine_objective_backpropagates_the_weighted_total(name, placement):
    """Through the engine's Objective, d total / d pred_t = w_t dL_t / d pred_t; deep supervision gets
    0.5 dL / d side outside the weighting (official) or w_t 0.5 dL / d side inside it (in_task)."""
    from densemtl.dataset_info import DatasetInfo
    from densemtl.engine.objective import Objective, to_target_size
    from densemtl.tasks import build_tasks

    info = DatasetInfo(name="toy", tasks=tuple(TASKS), num_classes={"semseg": 3})
    tasks = build_tasks(TASKS, info)
    balancer = build_balancer(
        LossConfig(balancer=name, balancer_args={"projection": "none"} if name == "lps" else {}), TASKS
    )
    _perturb(balancer)
    objective = Objective(tasks, balancer, traceback_weight=0.5, deep_supervision=placement)
    torch.manual_seed(0)
    batch = {
        "semseg": torch.randint(0, 3, (2, 8, 8)),
        "depth": torch.rand(2, 1, 8, 8) + 0.5,
        "edge": (torch.rand(2, 1, 8, 8) > 0.8).float(),
    }
    pred = {t: torch.randn(2, task.channels, 8, 8, requires_grad=True) for t, task in tasks.items()}
    side = {t: torch.randn(2, task.channels, 4, 4, requires_grad=True) for t, task in tasks.items()}
    output = {"pred": pred, "intermediate": {t: [side[t]] for t in TASKS}}
    total, figures = objective(output, batch, step=0, shared=[])
    total.backward()
    for t, task in tasks.items():
        alone_pred, alone_side = torch.autograd.grad(
            task.loss(pred[t], batch[t]) + 0.5 * task.loss(to_target_size(side[t], batch[t]), batch[t]),
            [pred[t], side[t]],
        )
        weight = figures[f"weight/{t}"].item()
        assert weight != pytest.approx(1.0)  # the perturbed weights tell the two placements apart
        side_weight = weight if placement == "in_task" else 1.0
        torch.testing.assert_close(pred[t].grad, weight * alone_pred, rtol=1e-4, atol=1e-8)
        torch.testing.assert_close(side[t].grad, side_weight * alone_side, rtol=1e-4, atol=1e-8)


def test_gradnorm_last_parameters_restricts_the_norms():
    def run(args: dict, extra: bool) -> dict[str, float]:
        balancer = build_balancer(LossConfig(balancer="gradnorm", balancer_args=args), TASKS)
        optimizer = torch.optim.SGD(balancer.parameters(), lr=0.05)
        early = nn.Parameter(torch.ones(3))  # a shared tensor whose gradients favour semseg 10x
        shared = nn.Parameter(torch.ones(3))
        for step in range(5):
            out = shared * torch.tensor([1.0, 4.0, 1.0]) + early * torch.tensor([10.0, 0.0, 0.0])
            losses = {t: out[i] ** 2 / 2 for i, t in enumerate(TASKS)}
            optimizer.zero_grad()
            total, weights = balancer.combine(losses, step, [early, shared] if extra else [shared])
            total.backward()
            optimizer.step()
        return weights

    assert run({"last_parameters": 1}, extra=True) == pytest.approx(run({}, extra=False))
    assert run({}, extra=True) != pytest.approx(run({}, extra=False))
    with pytest.raises(ConfigError, match="last_parameters"):
        build_balancer(_config("gradnorm", last_parameters=-1), TASKS)


class HalfBalancer(Balancer):
    """A toy scheme defined outside the package: every base weight times ``factor``."""

    name = "half"

    def __init__(self, task_names: list[str], base_weights: dict[str, float], *, factor: float = 0.5) -> None:
        super().__init__(task_names, base_weights)
        self.factor = factor

    def combine(self, losses, step, shared_parameters=None):
        stacked = self._stack(losses)
        weights = self.factor * self.base
        return (weights * stacked).sum(), self._as_dict(weights)


def test_a_new_scheme_is_one_class_and_one_registry_row():
    BALANCERS.register("half", HalfBalancer)
    try:
        balancer = build_balancer(_config("half", factor="0.25"), TASKS)  # options typed from the signature
        total, weights = balancer.combine({t: torch.tensor(2.0) for t in TASKS}, 0)
        assert isinstance(balancer, HalfBalancer) and balancer.factor == 0.25
        assert weights == {"semseg": 0.25, "depth": 0.25, "edge": 12.5}
        assert total.item() == pytest.approx(2.0 * (0.25 + 0.25 + 12.5))
        with pytest.raises(ConfigError, match="unknown option for 'half'"):
            build_balancer(_config("half", window=3), TASKS)
    finally:
        BALANCERS.unregister("half")
    with pytest.raises(ConfigError, match="unknown balancer 'half'"):
        build_balancer(_config("half"), TASKS)
