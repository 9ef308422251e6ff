"""Gradient-manipulating balancers: the published behaviour on hand-made gradients, and the engine's
per-task gradient path (heads untouched, DDP equal to one process on the global batch, loss scaling).

The references are computed here, from the papers' definitions, with scipy where a solver is needed.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from scipy.optimize import least_squares, minimize

from densemtl.config import LossConfig
from densemtl.engine import distributed
from densemtl.engine.checkpoint import load_checkpoint
from densemtl.errors import ConfigError, TrainingDiverged
from densemtl.losses.balancers import build_balancer
from densemtl.losses.balancers.gradient import GradientBalancer
from densemtl.registry import BALANCERS
from tests.conftest import GroupNormNet, free_port, make_trainer, tiny_config

TWO = ["semseg", "depth"]
THREE = ["semseg", "depth", "edge"]


def _balancer(name: str, tasks: list[str], **args) -> GradientBalancer:
    return build_balancer(LossConfig(balancer=name, weights=dict.fromkeys(tasks, 1.0), balancer_args=args), tasks)


def _combined(balancer: GradientBalancer, grads: list[list[float]], losses: list[float] | None = None, step: int = 0):
    g = torch.tensor(grads, dtype=torch.float64)
    loss = torch.tensor(losses if losses is not None else [1.0] * len(grads), dtype=torch.float64)
    return balancer.combine_gradients(g, loss, step), g


def _simplex_reference(objective, count: int) -> np.ndarray:
    constraint = {"type": "eq", "fun": lambda w: w.sum() - 1}
    result = minimize(objective, np.full(count, 1 / count), bounds=[(0, 1)] * count, constraints=constraint,
                      method="SLSQP", options={"ftol": 1e-15, "maxiter": 1000})
    return result.x


# --- PCGrad -----------------------------------------------------------------------------------------


def test_pcgrad_projects_conflicting_gradients_onto_each_others_normal_plane():
    balancer = _balancer("pcgrad", TWO)
    update, g = _combined(balancer, [[1.0, 0.0], [-1.0, 1.0]])  # g1 . g2 = -1: a conflict
    projected_1 = g[0] - (g[0] @ g[1]) / (g[1] @ g[1]) * g[1]  # (0.5, 0.5)
    projected_2 = g[1] - (g[1] @ g[0]) / (g[0] @ g[0]) * g[0]  # (0, 1)
    assert projected_1 @ g[1] == pytest.approx(0.0) and projected_2 @ g[0] == pytest.approx(0.0)
    torch.testing.assert_close(update, projected_1 + projected_2)
    torch.testing.assert_close(update, torch.tensor([0.5, 1.5], dtype=torch.float64))
    agreeing, g = _combined(balancer, [[1.0, 0.2], [0.3, 1.0]])  # no conflict: the plain sum
    torch.testing.assert_close(agreeing, g.sum(0))


def test_pcgrad_with_three_tasks_follows_the_algorithm_in_the_drawn_order():
    torch.manual_seed(3)
    g = torch.randn(3, 6, dtype=torch.float64)
    g[1] = -0.7 * g[0] + 0.3 * g[1]  # tasks 0 and 1 conflict
    balancer = _balancer("pcgrad", THREE, seed=5)
    update = balancer.combine_gradients(g, torch.ones(3), step=11)
    generator = torch.Generator().manual_seed(5 * 1_000_003 + 11)  # the documented order: seed and step
    expected = []
    for i in range(3):
        projected = g[i].clone()
        for j in torch.randperm(3, generator=generator).tolist():
            if j != i and projected @ g[j] < 0:
                projected -= (projected @ g[j]) / (g[j] @ g[j]) * g[j]
        expected.append(projected)
    torch.testing.assert_close(update, torch.stack(expected).sum(0))
    assert not torch.allclose(update, g.sum(0))


# --- MGDA-UB ----------------------------------------------------------------------------------------


def test_mgda_finds_the_min_norm_point_of_two_gradients():
    balancer = _balancer("mgda", TWO, normalization="none")
    update, g = _combined(balancer, [[1.0, 0.0], [-0.5, 1.0]])
    # closed form: a = (g2 - g1).g2 / |g1 - g2|^2, point a g1 + (1 - a) g2
    share = ((g[1] - g[0]) @ g[1]) / ((g[0] - g[1]) @ (g[0] - g[1]))
    torch.testing.assert_close(update, share * g[0] + (1 - share) * g[1])
    # every point of the segment is at least as long, and the point is orthogonal to the segment
    for a in np.linspace(0, 1, 21):
        assert (a * g[0] + (1 - a) * g[1]).norm() >= update.norm() - 1e-12
    assert update @ (g[0] - g[1]) == pytest.approx(0.0, abs=1e-12)
    # it decreases both losses (a common descent direction)
    assert (g @ update > 0).all()


def test_mgda_min_norm_point_of_three_gradients_matches_scipy():
    torch.manual_seed(0)
    g = torch.randn(3, 5, dtype=torch.float64)
    g[2] = -0.5 * g[0] + 0.2 * g[2]
    balancer = _balancer("mgda", THREE, normalization="none")
    update = balancer.combine_gradients(g, torch.ones(3), 0)
    gram = (g @ g.T).numpy()
    weights = _simplex_reference(lambda w: w @ gram @ w, 3)
    torch.testing.assert_close(balancer.last_coefficients, torch.from_numpy(weights), atol=1e-5, rtol=0)
    # optimality: g_t . d >= |d|^2 for every task, with equality where the weight is positive
    products, squared = (g @ update).numpy(), float(update @ update)
    assert (products >= squared - 1e-9).all()
    active = balancer.last_coefficients.numpy() > 1e-9
    np.testing.assert_allclose(products[active], squared, rtol=1e-7)


def test_mgda_normalisations_divide_the_gradients_before_the_min_norm_problem():
    g = torch.tensor([[4.0, 0.0], [-0.5, 1.0]], dtype=torch.float64)
    losses = torch.tensor([2.0, 0.5], dtype=torch.float64)
    norms = g.norm(dim=1)
    for normalization, divisor in [("l2", norms), ("loss", losses), ("loss+", losses * norms)]:
        balancer = _balancer("mgda", TWO, normalization=normalization)
        update = balancer.combine_gradients(g, losses, 0)
        plain = _balancer("mgda", TWO, normalization="none")
        plain.combine_gradients(g / divisor[:, None], losses, 0)
        torch.testing.assert_close(balancer.last_coefficients, plain.last_coefficients)
        torch.testing.assert_close(update, balancer.last_coefficients @ g)  # the weights take the raw gradients
    with pytest.raises(ConfigError, match="normalization"):
        _balancer("mgda", TWO, normalization="max")


# --- CAGrad -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("c", [0.4, 0.9])
def test_cagrad_matches_the_published_dual_solved_by_scipy(c):
    torch.manual_seed(1)
    g = torch.randn(3, 4, dtype=torch.float64)
    g[1] = -0.8 * g[0] + 0.4 * g[1]
    balancer = _balancer("cagrad", THREE, c=c)
    update = balancer.combine_gradients(g, torch.ones(3), 0)
    gram = (g @ g.T).numpy()
    mean_norm = np.sqrt(gram.mean())
    towards_mean = gram.mean(axis=1)
    w = _simplex_reference(lambda w: w @ towards_mean + c * mean_norm * np.sqrt(w @ gram @ w), 3)
    g_w = torch.from_numpy(w) @ g
    expected = (g.mean(0) + c * mean_norm / g_w.norm() * g_w) / (1 + c**2)
    torch.testing.assert_close(update, expected, atol=1e-5 * expected.norm().item(), rtol=0)
    # the worst task improves more than under the plain average (the point of the method)
    assert (g @ update).min() > (g @ g.mean(0)).min() / (1 + c**2)


def test_cagrad_without_a_ball_is_the_average_gradient():
    update, g = _combined(_balancer("cagrad", TWO, c=0.0), [[1.0, 0.0], [-0.5, 1.0]])
    torch.testing.assert_close(update, g.mean(0))


# --- Nash-MTL ---------------------------------------------------------------------------------------


def _nash_reference(gram: np.ndarray) -> np.ndarray:
    """``a > 0`` with ``K a = 1 / a`` for the Frobenius-normalised Gram matrix, by scipy's least squares."""
    normed = gram / np.linalg.norm(gram)
    result = least_squares(lambda a: normed @ a - 1 / a, np.ones(len(gram)), bounds=(1e-9, np.inf), xtol=1e-15,
                           ftol=1e-15, gtol=1e-15)
    return result.x


def test_nashmtl_matches_the_bargaining_solution_solved_by_scipy():
    torch.manual_seed(2)
    g = torch.randn(3, 6, dtype=torch.float64)
    g[2] = -0.6 * g[0] + 0.5 * g[2]
    balancer = _balancer("nashmtl", THREE, max_norm=0.0)
    update = balancer.combine_gradients(g, torch.ones(3), 0)
    gram = (g @ g.T).numpy()
    alpha = _nash_reference(gram)
    torch.testing.assert_close(balancer.last_coefficients, torch.from_numpy(alpha), rtol=1e-6, atol=0)
    # the bargaining property: each task's share of the (normalised) update is 1 / a_t
    shares = (g @ update).numpy() / np.linalg.norm(gram)
    np.testing.assert_allclose(shares, 1 / alpha, rtol=1e-6)
    assert (shares > 0).all()  # every task's loss decreases


def test_nashmtl_clips_the_update_and_reuses_weights_between_updates():
    g = torch.tensor([[3.0, 0.0], [-1.0, 2.0]], dtype=torch.float64)
    clipped = _balancer("nashmtl", TWO, max_norm=0.5)
    assert clipped.combine_gradients(g, torch.ones(2), 0).norm().item() == pytest.approx(0.5)
    every_other = _balancer("nashmtl", TWO, max_norm=0.0, update_every=2)
    every_other.combine_gradients(g, torch.ones(2), 0)
    kept = every_other.alpha.clone()
    every_other.combine_gradients(torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64), torch.ones(2), 1)
    torch.testing.assert_close(every_other.alpha, kept)  # step 1: the weights of step 0
    every_other.combine_gradients(torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64), torch.ones(2), 2)
    torch.testing.assert_close(every_other.alpha, torch.ones(2, dtype=torch.float64) * 2**0.25, rtol=1e-6, atol=0)
    with pytest.raises(ConfigError, match="update_every"):
        _balancer("nashmtl", TWO, update_every=0)


# --- shared by all four -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["pcgrad", "cagrad", "mgda", "nashmtl"])
def test_a_task_with_a_zero_gradient_is_left_out(name):
    """A task without labelled samples in the batch has a zero gradient: it gets weight 0 and the others
    are combined as if it were not there."""
    g = torch.tensor([[1.0, 0.0, 0.0], [-0.5, 1.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    with_empty = _balancer(name, THREE)
    update = with_empty.combine_gradients(g, torch.tensor([1.0, 2.0, 0.0], dtype=torch.float64), 0)
    alone = _balancer(name, TWO)
    expected = alone.combine_gradients(g[:2], torch.tensor([1.0, 2.0], dtype=torch.float64), 0)
    torch.testing.assert_close(update, expected)
    assert with_empty.last_coefficients[2] == 0 and torch.isfinite(update).all()
    nothing = _balancer(name, TWO).combine_gradients(torch.zeros(2, 3, dtype=torch.float64), torch.zeros(2), 0)
    assert torch.equal(nothing, torch.zeros(3, dtype=torch.float64))


def test_gradient_option_is_checked():
    with pytest.raises(ConfigError, match="loss.balancer_args.gradients"):
        _balancer("pcgrad", TWO, gradients="features")
    assert _balancer("mgda", TWO).gradients == "representation"  # the paper's upper bound
    assert _balancer("cagrad", TWO).c == 0.4 and _balancer("nashmtl", TWO).max_norm == 1.0


# --- the engine's per-task gradient path ------------------------------------------------------------


class ScaledSum(GradientBalancer):
    """A toy scheme: every coefficient is ``factor`` (1 reproduces ``fixed``)."""

    name = "scaled_sum"

    def __init__(self, task_names, base_weights, *, gradients: str = "parameters", factor: float = 1.0) -> None:
        super().__init__(task_names, base_weights, gradients)
        self.factor = factor

    def _coefficients(self, gram, losses, step, tasks):
        return np.full(len(gram), self.factor)


@pytest.fixture
def scaled_sum():
    BALANCERS.register("scaled_sum", ScaledSum)
    yield
    BALANCERS.unregister("scaled_sum")


def _step_gradients(tmp_path: Path, *overrides: str, model_class=None, scaler=None) -> dict[str, torch.Tensor]:
    """The gradients one training step hands to the optimiser (which is stopped from stepping)."""
    config = tiny_config(tmp_path, "train.grad_clip=null", *overrides)
    trainer = make_trainer(config, tmp_path / "run", model_class)
    if scaler is not None:
        trainer.scaler = scaler
    captured: dict[str, torch.Tensor] = {}

    def record(*args, **kwargs) -> None:
        captured.update({n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None})

    trainer.optimizer.step = record
    trainer.last_figures = trainer.train_step()
    return captured


def _owned(name: str) -> bool:
    return bool({"semseg", "depth", "normals", "edge"}.intersection(name.split(".")))


@pytest.mark.parametrize("gradients", ["parameters", "representation"])
def test_engine_replaces_only_the_shared_gradient(tmp_path, scaled_sum, gradients):
    """Coefficients 1 give fixed's gradients; coefficients 0.5 halve the backbone's and neck's and leave
    every head's untouched. (Summing the per-task gradients rounds in another order than one backward
    pass, hence a tolerance relative to each tensor's scale.)"""
    fixed = _step_gradients(tmp_path, "loss.balancer=fixed")
    same = _step_gradients(tmp_path, "loss.balancer=scaled_sum", f"loss.balancer_args={{gradients: {gradients}}}")
    half = _step_gradients(tmp_path, "loss.balancer=scaled_sum",
                           f"loss.balancer_args={{gradients: {gradients}, factor: 0.5}}")
    assert set(fixed) == set(same) == set(half) and any(n.startswith("neck") for n in fixed)
    for name, grad in fixed.items():
        scale = 1e-5 * grad.abs().max().item()
        torch.testing.assert_close(same[name], grad, rtol=1e-5, atol=scale)
        torch.testing.assert_close(half[name], grad if _owned(name) else 0.5 * grad, rtol=1e-5, atol=scale)


def test_representation_needs_one_micro_batch(tmp_path):
    with pytest.raises(ConfigError, match="train.accumulate"):
        make_trainer(tiny_config(tmp_path, "loss.balancer=mgda", "train.accumulate=2"))


def test_accumulated_micro_batches_combine_their_summed_gradients(tmp_path):
    """Two micro-batches of 2 give the update of one batch of 4 (the per-task gradients are summed first).

    The two float32 sums run in different orders (and the CPU kernels may pick their order per run: a
    relative difference of 3.6e-5 was once seen on a one-element tensor), hence 1e-4; averaging instead of
    summing the micro-batches would be off by half."""
    common = ["loss.balancer=cagrad", "data.flip=false", "data.tasks=[semseg,depth]"]
    whole = _step_gradients(tmp_path, *common, "data.batch_size=4", model_class=GroupNormNet)
    halves = _step_gradients(tmp_path, *common, "data.batch_size=2", "train.accumulate=2", model_class=GroupNormNet)
    for name, grad in whole.items():
        torch.testing.assert_close(halves[name], grad, rtol=1e-4, atol=1e-4 * grad.abs().max().item())


# --- mixed precision --------------------------------------------------------------------------------


def test_loss_scaled_gradients_are_unscaled_before_the_combination(tmp_path):
    """With fp16-style loss scaling (a GradScaler at 2^12) the optimiser gets the unscaled step's gradients:
    Nash-MTL's update does not scale with its input, so a missed unscale would show."""
    common = ["loss.balancer=nashmtl", "data.tasks=[semseg,depth]"]
    plain = _step_gradients(tmp_path, *common, model_class=GroupNormNet)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    scaled = _step_gradients(tmp_path, *common, model_class=GroupNormNet, scaler=scaler)
    for name, grad in plain.items():
        torch.testing.assert_close(scaled[name], grad, rtol=1e-5, atol=1e-8)


def test_an_overflowing_step_is_skipped_and_leaves_the_balancer_alone(tmp_path):
    config = tiny_config(tmp_path, "loss.balancer=nashmtl", "data.tasks=[semseg,depth]", "loss.weights={semseg: 1e6}")
    trainer = make_trainer(config, tmp_path / "run", GroupNormNet)
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**120)  # scaled gradients overflow to inf
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    figures = trainer.train_step()
    assert figures["skipped_combination"] == 1.0 and trainer.scaler.get_scale() < 2.0**120
    for name, param in trainer.model.named_parameters():
        assert torch.equal(param, before[name]), f"{name} moved on a skipped step"
    balancer = trainer.objective.balancer
    assert torch.equal(balancer.alpha, torch.ones(2, dtype=torch.float64))
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    assert trainer.train_step()["skipped_combination"] == 0.0
    assert not torch.equal(balancer.alpha, torch.ones(2, dtype=torch.float64))


@pytest.mark.parametrize("gradients", ["parameters", "representation"])
def test_a_non_finite_combination_meets_the_trainers_guard(tmp_path, scaled_sum, gradients):
    """A combination that comes out non-finite (coefficients of infinity here) is never stepped on: without
    loss scaling training stops before the optimiser step, naming a shared parameter; with fp16 scaling the
    scaler sees it (the combination is written before it unscales), skips the step and halves its scale."""
    common = ["loss.balancer=scaled_sum", f"loss.balancer_args={{gradients: {gradients}}}", "data.tasks=[semseg,depth]"]
    trainer = make_trainer(tiny_config(tmp_path, *common), tmp_path / "plain", GroupNormNet)
    trainer.objective.balancer.factor = float("inf")
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    with pytest.raises(TrainingDiverged, match=r"non-finite gradient after step 0 \(first in 'body\."):
        trainer.train_step()
    assert all(torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())
    scaled = make_trainer(tiny_config(tmp_path, *common), tmp_path / "scaled", GroupNormNet)
    scaled.scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    scaled.objective.balancer.factor = float("inf")
    scaled.train_step()
    assert all(torch.equal(p, before[n]) for n, p in scaled.model.named_parameters())
    assert scaled.scaler.get_scale() == 128.0 and scaled.step == 1
    scaled.objective.balancer.factor = 1.0
    scaled.train_step()
    assert not all(torch.equal(p, before[n]) for n, p in scaled.model.named_parameters())


@pytest.mark.parametrize("name", ["pcgrad", "mgda"])
def test_bf16_autocast_gives_close_finite_steps(tmp_path, name):
    common = [f"loss.balancer={name}", "data.tasks=[semseg,depth]"]
    full = _step_gradients(tmp_path, *common, model_class=GroupNormNet)
    half = _step_gradients(tmp_path, *common, "train.amp=bf16", model_class=GroupNormNet)
    for key, grad in full.items():
        assert torch.isfinite(half[key]).all()
        assert (half[key] - grad).norm() <= 0.05 * grad.norm() + 1e-6, key


# --- DDP --------------------------------------------------------------------------------------------

DDP_OVERRIDES = ["data.tasks=[semseg,depth]", "data.flip=false", "train.steps=3", "train.lr=1e-2",
                 "train.warmup_steps=0"]
PER_RANK_BATCH = 2


BALANCER_CASES = {
    "nashmtl": ["loss.balancer=nashmtl"],  # per-task gradients of the shared parameters, all-reduced
    "mgda": ["loss.balancer=mgda"],  # the representation's Gram matrix, summed over the ranks
}


def _ddp_worker(rank: int, world: int, port: int, tmp: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist_info, device = distributed.setup("cpu")
    try:
        for case, balancer in BALANCER_CASES.items():
            config = tiny_config(Path(tmp), *DDP_OVERRIDES, *balancer, f"data.batch_size={PER_RANK_BATCH}")
            make_trainer(config, Path(tmp) / case / "ddp", GroupNormNet, dist_info=dist_info, device=device).fit()
    finally:
        distributed.cleanup()


def test_two_gloo_processes_match_one_process_on_the_global_batch(tmp_path):
    """Both gradient sources (one spawn for both, to keep the suite short)."""
    world = 2
    initial = {}
    for case, balancer in BALANCER_CASES.items():
        config = tiny_config(tmp_path, *DDP_OVERRIDES, *balancer, f"data.batch_size={PER_RANK_BATCH * world}")
        single = make_trainer(config, tmp_path / case / "single", GroupNormNet)
        initial[case] = {k: v.clone() for k, v in single.model.state_dict().items()}
        single.fit()
    mp.spawn(_ddp_worker, args=(world, free_port(), str(tmp_path)), nprocs=world, join=True)
    for case in BALANCER_CASES:
        one = load_checkpoint(tmp_path / case / "single" / "checkpoints" / "last.pt")
        ddp = load_checkpoint(tmp_path / case / "ddp" / "checkpoints" / "last.pt")
        for name, value in one["model"].items():
            assert not torch.equal(value, initial[case][name]), f"{case}: {name} did not train"
            torch.testing.assert_close(ddp["model"][name], value, rtol=1e-5, atol=1e-6,
                                       msg=f"{case}: {name}: DDP != one process")
        for name, value in one["objective"].items():  # the balancer's state (Nash-MTL's weights) agrees too
            torch.testing.assert_close(ddp["objective"][name], value, rtol=1e-5, atol=1e-8)
