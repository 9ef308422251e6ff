"""Computation sharing: hard-concrete L0, gates and losses, frozen masks, both inference modes' exactness and
FLOP counts, the pretrained base and the paper-scale configs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from densemtl.config import load_config
from densemtl.data.synthetic import synthetic_info
from densemtl.errors import ConfigError
from densemtl.models import build_model
from densemtl.models.hard_concrete import HardConcreteGate
from densemtl.models.sharing.inference import ElementExecutor, ReuseExecutor, SharedInference, WeightCorrection
from densemtl.models.sharing.model import SharingModel, delta_storage, temporal_hook
from densemtl.models.vit_blocks import EMBED, AttentionRef, DenseExecutor, LinearRef
from densemtl.tasks import build_tasks
from tests.conftest import tiny_model


def test_hard_concrete_expected_l0_falls_under_its_penalty() -> None:
    torch.manual_seed(0)
    gate = HardConcreteGate((64, 32), init=2.0, scale=10.0)
    start = gate.expected_l0().item()
    optimizer = torch.optim.Adam(gate.parameters(), lr=0.05)
    for _ in range(60):
        optimizer.zero_grad()
        gate.expected_l0().backward()
        optimizer.step()
    assert gate.expected_l0().item() < 0.2 * start
    gate.eval()
    values = gate()
    assert ((values == 0) | (values > 0)).all() and (values == 0).float().mean() > 0.8
    gate.train()
    samples = gate()
    assert samples.min() >= 0 and samples.max() <= 1


def test_gate_freeze_gives_binary_mask_of_test_time_nonzeros() -> None:
    torch.manual_seed(0)
    gate = HardConcreteGate((8, 8), init=0.0, scale=1.0)
    with torch.no_grad():
        gate.raw.normal_(0.0, 3.0)
    expected = gate.deterministic() > 0
    gate.freeze()
    assert torch.equal(gate.mask, expected)
    gate.train()
    assert torch.equal(gate(), expected.float())
    assert float(gate.expected_l0()) == float(expected.sum())


def test_frozen_mask_phase_changes_no_masked_out_entry() -> None:
    model = tiny_model()
    model.set_phase(2)
    model.train()
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    masks = {(t, n): d.gate.mask.clone() for t in model.sub_tasks for n, d in model.deltas[t].items()}
    assert any((~m).any() for m in masks.values()) and any(m.any() for m in masks.values())
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    image = torch.randn(2, 3, 32, 48)
    for _ in range(3):
        optimizer.zero_grad()
        out = model(image)
        sum(out["pred"][t].pow(2).mean() for t in model.sub_tasks).backward()
        optimizer.step()
    after = model.state_dict()
    changed_unmasked = 0
    for task in model.sub_tasks:
        for name, delta in model.deltas[task].items():
            key = f"deltas.{task}.{name}.delta"
            mask = masks[task, name]
            assert torch.equal(delta.gate.mask, mask)
            assert torch.equal(after[key][~mask], before[key][~mask])
            assert (after[key][~mask] == 0).all()
            changed_unmasked += int((after[key][mask] != before[key][mask]).sum())
            for gate in ("gate", "tensor_gate"):
                key = f"deltas.{task}.{name}.{gate}.raw"
                assert torch.equal(after[key], before[key])
    assert changed_unmasked > 0
    for key in before:  # the base model is frozen too
        if key.startswith("encoder.") or key.startswith(f"decoders.{model.base_task}."):
            assert torch.equal(after[key], before[key]), key


@pytest.mark.parametrize("mode", ["element", "token"])
def test_threshold_zero_equals_dense_subtask(mode: str) -> None:
    model = tiny_model()
    image = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        dense = model(image)["pred"]
    shared = SharedInference(model, threshold=0.0, mode=mode).run(image)
    for task in model.tasks:
        torch.testing.assert_close(shared.pred[task], dense[task], rtol=1e-5, atol=1e-5)
        assert shared.recomputed[task] == 1.0 or mode == "token"


@pytest.mark.parametrize("mode", ["element", "token"])
def test_huge_threshold_equals_the_base(mode: str) -> None:
    """Every point of every sub-task passes on the base's value; the encoder output is the base's."""
    model = tiny_model()
    image = torch.randn(2, 3, 32, 48)
    inference = SharedInference(model, threshold=1e9, mode=mode)
    result = inference.run(image)
    base = result.traces[model.base_task]
    for task in model.sub_tasks:
        assert set(result.traces[task]) == set(inference.names)
        for name, ref in result.traces[task].items():
            if isinstance(ref, LinearRef):
                assert torch.equal(ref.y, base[name].y), name
            elif isinstance(ref, AttentionRef):
                assert torch.equal(ref.out, base[name].out), name
            else:
                assert torch.equal(ref, base[name]), name
        assert result.recomputed[task] == 0.0
    with torch.no_grad():  # the decoders see the base encoder's tokens
        tokens, grid = model.encoder(image, DenseExecutor(model.task_weights(model.base_task)))
        for task in model.sub_tasks:
            raw = model.decoders[task](tokens, grid, (32, 48))[0]
            torch.testing.assert_close(result.pred[task], raw, rtol=1e-5, atol=1e-5)


def test_element_mode_passes_base_or_own_values_and_counts_their_density() -> None:
    model = tiny_model()
    image = torch.randn(1, 3, 32, 48)
    tau = 0.05
    inference = SharedInference(model, threshold=tau, mode="element")
    result = inference.run(image)
    base = result.traces[model.base_task]
    task = model.sub_tasks[0]
    # recompute the sub-task from its own thresholded inputs, point by point
    weights = inference.weights[task]
    dense_flops, counted = 0, 0
    for name in inference.names:
        if name == EMBED:
            continue
        own = result.traces[task][name]
        y = F.linear(own.x, weights[f"{name}.weight"], weights[f"{name}.bias"])
        passed, reference = own.y, base[name].y
        is_own = torch.isclose(passed, y, rtol=1e-5, atol=1e-6) & ((y - reference).abs() >= tau)
        is_base = (passed == reference) & ((y - reference).abs() < tau + 1e-6)
        assert bool((is_own | is_base).all()), name
        share = result.points[task][name]
        assert 0.0 < share < 1.0, name
        flops = 2 * own.x.numel() * weights[f"{name}.weight"].shape[0]
        dense_flops += flops
        counted += flops * share
    assert counted < dense_flops
    dense = inference.dense(image)
    assert result.flops[task] < dense.flops[task]
    assert result.flops[model.base_task] == dense.flops[model.base_task]


def test_token_skipping_equals_dense_on_computed_tokens() -> None:
    model = tiny_model()
    image = torch.randn(2, 3, 32, 48)
    inference = SharedInference(model, threshold=0.15, mode="token")
    result = inference.run(image)
    base = result.traces[model.base_task]
    for task in model.sub_tasks:
        saved = 0
        for name in model.encoder.linear_names:
            ref = result.traces[task][name]
            weight, bias = inference.weights[task][f"{name}.weight"], inference.weights[task][f"{name}.bias"]
            computed = (ref.x != base[name].x).any(dim=1)
            saved += int((~computed).sum())
            torch.testing.assert_close(ref.y[computed], F.linear(ref.x[computed], weight, bias), rtol=1e-5, atol=1e-5)
        assert saved > 0
        assert 0.0 < result.recomputed[task] < 1.0


def test_reuse_linear_layer_rules() -> None:
    """Selected tokens are exact, the others keep the reference plus the significant weight correction."""
    torch.manual_seed(0)
    x_ref = torch.randn(10, 6)
    w_base, b_base = torch.randn(4, 6), torch.randn(4)
    delta = torch.zeros(4, 7)
    delta[0, 0] = 2.0  # large correction on output channel 0
    w_sub, b_sub = w_base + delta[:, :-1], b_base + delta[:, -1]
    x = x_ref.clone()
    x[[1, 5]] += 1.0
    executor = ReuseExecutor(
        {"l.weight": w_sub, "l.bias": b_sub}, {"l": LinearRef(x_ref, F.linear(x_ref, w_base, b_base))}, {"l": 0.5},
        {"l": WeightCorrection(delta[:, :-1], delta[:, -1])},
    )
    y = executor.linear("l", x[None])[0]
    torch.testing.assert_close(y[[1, 5]], F.linear(x[[1, 5]], w_sub, b_sub))
    rest = [i for i in range(10) if i not in (1, 5)]
    correction = 2.0 * x_ref[rest, 0]
    expected = F.linear(x_ref[rest], w_base, b_base)
    expected[:, 0] += torch.where(correction.abs() > 0.5, correction, torch.zeros_like(correction))
    torch.testing.assert_close(y[rest], expected)
    assert executor.recomputed["l"] == (2, 10)
    assert executor.flops == 2 * 2 * 6 * 4 + WeightCorrection(delta[:, :-1], delta[:, -1]).flops_per_token * 8


def test_element_executor_rule_on_one_linear() -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 10, 6)
    weight, bias = torch.randn(4, 6), torch.randn(4)
    y = F.linear(x, weight, bias)[0]
    reference = y + torch.randn(10, 4) * 0.2
    executor = ElementExecutor({"l.weight": weight, "l.bias": bias}, {"l": LinearRef(x[0], reference)}, {"l": 0.2})
    out = executor.linear("l", x)[0]
    kept = (y - reference).abs() >= 0.2
    assert torch.equal(out, torch.where(kept, y, reference))
    assert executor.recomputed["l"] == (int(kept.sum()), 40)
    assert executor.flops == round(2 * 10 * 6 * 4 * int(kept.sum()) / 40)


def test_weight_correction_sparse_and_dense_agree() -> None:
    torch.manual_seed(0)
    delta = torch.randn(16, 9) * (torch.rand(16, 9) < 0.05)
    x = torch.randn(5, 8)
    sparse = WeightCorrection(delta[:, :-1], delta[:, -1], sparse_below=1.0)
    dense = WeightCorrection(delta[:, :-1], delta[:, -1], sparse_below=0.0)
    assert sparse.sparse and not dense.sparse
    torch.testing.assert_close(sparse(x), dense(x))
    assert sparse.flops_per_token == 2 * int((delta[:, :-1] != 0).sum())


def test_dense_flop_count_matches_torch_flop_counter() -> None:
    model = tiny_model()
    image = torch.randn(1, 3, 32, 48)
    traced = DenseExecutor(model.task_weights(model.base_task), trace=True)  # attention as two matmuls
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.encoder(image, traced)
    assert traced.flops == counter.get_total_flops()
    fused = DenseExecutor(model.task_weights(model.base_task))  # the fused attention is counted alike
    with torch.no_grad():
        tokens, _ = model.encoder(image, fused)
        reference, _ = model.encoder(image, DenseExecutor(model.task_weights(model.base_task), trace=True))
    assert fused.flops == traced.flops
    torch.testing.assert_close(tokens, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["element", "token"])
def test_savings_are_counted_and_storage_reported(mode: str) -> None:
    model = tiny_model()
    image = torch.randn(1, 3, 32, 48)
    inference = SharedInference(model, threshold=0.15, mode=mode)
    shared, dense = inference.run(image), inference.dense(image)
    for task in model.sub_tasks:
        assert shared.flops[task] < dense.flops[task]
    storage = delta_storage(model)
    for task in model.sub_tasks:
        share = storage[task]["share"]
        assert 0.0 < share < 1.0
        assert storage[task]["sparse_bytes"] == 8 * storage[task]["nonzero"]


def test_forward_contract_and_phase_losses() -> None:
    model = tiny_model(trained=False)
    image = torch.randn(2, 3, 32, 48)
    model.eval()
    out = model(image)
    assert set(out["pred"]) == set(model.tasks) and set(out["features"]) == set(model.tasks)
    for task in model.tasks:
        assert out["pred"][task].shape[-2:] == (32, 48)
        assert out["features"][task].shape[1] == model.feature_channels[task]
    model.train()
    assert set(model(image)["pred"]) == {model.base_task}
    model.set_phase(1)
    extra = model(image)["extra_losses"]
    assert set(extra) == {"l0"} and extra["l0"].requires_grad
    model.set_phase(3)
    extra = model(image)["extra_losses"]
    assert set(extra) == {"activation"}


def test_temporal_term_compares_with_the_detached_neighbour() -> None:
    model = tiny_model(["sharing.temporal_weight=0.5"], trained=False)
    model.set_phase(0, temporal=True)
    model.train()
    image, neighbour = torch.randn(2, 3, 32, 48), torch.randn(2, 3, 32, 48)
    output = model(image)
    assert set(output["activations"]) == {model.base_task}
    assert set(output["activations"][model.base_task]) == {
        f"blocks.{i}.{kind}" for i in range(2) for kind in model.sharing.activation_layers
    }
    term = temporal_hook(model, output, {"image": image, "neighbour": neighbour})["temporal"]
    with torch.no_grad():
        then = model.encode(neighbour, model.base_task, record=True)[2].activations
    expected = 0.5 * sum((a - then[n]).abs().mean() for n, a in output["activations"][model.base_task].items())
    torch.testing.assert_close(term, expected)
    term.backward()  # the gradient reaches the encoder through the frame's branch only
    assert model.encoder.blocks[0].qkv.weight.grad is not None
    with pytest.raises(ConfigError, match="temporal_source"):
        temporal_hook(model, model(image), {"image": image})
    model.set_phase(0)  # the plain base phase records nothing
    assert "activations" not in model(image) and temporal_hook(model, model(image), {"image": image}) == {}


def test_temporal_term_on_a_shifted_copy_and_in_the_activation_phase() -> None:
    model = tiny_model(["sharing.temporal_weight=0.5", "sharing.temporal_source=shift"], trained=False)
    model.set_phase(3, temporal=True)
    model.train()
    image = torch.randn(2, 3, 32, 48)
    output = model(image)
    assert set(output["activations"]) == set(model.sub_tasks)
    term = temporal_hook(model, output, {"image": image})["temporal"]
    assert term.item() > 0 and term.requires_grad


def test_gates_per_tensor_and_the_gated_set() -> None:
    model = tiny_model(trained=False)
    delta = model.deltas["depth"]["blocks_0_norm1_weight"]
    assert delta.tensor_gate is not None and delta.tensor_gate.raw.shape == ()
    assert set(model.gated_names) == set(model.encoder.weights())  # every tensor but the final norm
    assert "pos" in model.gated_names and not any(name.startswith("norm.") for name in model.gated_names)
    elements = sum(t.numel() for t in model.encoder.weights().values())
    # log alpha 5 at temperature 1: every gate open with probability sigmoid(5)
    expected = torch.sigmoid(torch.tensor(5.0)) * (elements + len(model.gated_names))
    torch.testing.assert_close(model.expected_l0("depth"), expected)
    linears = tiny_model(["sharing.gated=linears", "sharing.tensor_gates=false"], trained=False)
    assert set(linears.gated_names) == {f"{n}.{k}" for n in linears.encoder.linear_names for k in ("weight", "bias")}
    assert linears.deltas["depth"]["patch_weight"].tensor_gate is None
    with torch.no_grad():  # a closed tensor gate closes the whole tensor
        delta.delta.fill_(1.0)
        delta.tensor_gate.raw.fill_(-10.0 / delta.tensor_gate.scale)
    model.eval()
    assert not model.effective_deltas("depth")["blocks.0.norm1.weight"].any()


def test_per_task_weights_and_reductions() -> None:
    model = tiny_model(["sharing.l0_weight={depth: 1.0, edge: 0.0}", "sharing.activation_reduction=sum",
                        "sharing.activation_weight={depth: 2.0, edge: 0.0}"], trained=False)
    image = torch.randn(2, 3, 32, 48)
    model.set_phase(1)
    model.train()
    torch.testing.assert_close(model(image)["extra_losses"]["l0"], model.expected_l0("depth"))
    model.set_phase(3)
    model.train()
    torch.manual_seed(1)
    with torch.no_grad():
        for delta in model.deltas["depth"].values():
            delta.delta.normal_(0.0, 0.05)
    term = model(image)["extra_losses"]["activation"]
    _, _, base_run = model.encode(image, model.base_task, record=True)
    _, _, depth_run = model.encode(image, "depth", record=True)
    expected = 2.0 * sum((depth_run.activations[n] - a).abs().sum() for n, a in base_run.activations.items())
    torch.testing.assert_close(term, expected)
    with pytest.raises(ConfigError, match="sharing.l0_weight"):
        tiny_model(["sharing.l0_weight={depth: 1.0}"], trained=False)


def test_sub_tasks_are_clipped_apart() -> None:
    model = tiny_model(trained=False)
    model.set_phase(1)
    groups = model.clip_groups()
    assert len(groups) == len(model.sub_tasks)
    ids = [{id(p) for p in group} for group in groups]
    assert not ids[0] & ids[1]
    assert set().union(*ids) == {id(p) for p in model.parameters() if p.requires_grad}


def test_bad_backbone_args_name_the_key() -> None:
    with pytest.raises(ConfigError, match="model.backbone_args.depth"):
        tiny_model(["model.backbone_args={depth: 2}"], trained=False)


def test_hugging_face_vit_weights_load_into_the_encoder(tmp_path) -> None:
    import transformers

    torch.manual_seed(0)
    hf_config = transformers.ViTConfig(
        hidden_size=24, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48, patch_size=8,
        image_size=32, layer_norm_eps=1e-6,
    )
    transformers.ViTModel(hf_config, add_pooling_layer=False).save_pretrained(tmp_path / "vit")
    hf = transformers.ViTModel.from_pretrained(tmp_path / "vit", add_pooling_layer=False).eval()
    model = tiny_model([f"model.pretrained={tmp_path / 'vit'}", "data.synthetic.height=32", "data.synthetic.width=32"],
                       trained=False)
    image = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        patches, grid = model.encoder.patchify(image)
        ours = model.encoder.patch(patches)
        theirs = hf.embeddings.patch_embeddings(image)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
        tokens = ours + model.encoder.position(grid)
        torch.testing.assert_close(tokens, theirs + hf.embeddings.position_embeddings[:, 1:], rtol=1e-5, atol=1e-5)
        hidden = tokens  # the HF blocks on the patch tokens alone (our encoder has no class token)
        for layer in hf.layers:
            hidden = layer(hidden)
        encoded, _ = model.encoder(image, DenseExecutor(model.encoder.weights()))
        torch.testing.assert_close(encoded, hf.layernorm(hidden), rtol=1e-4, atol=1e-4)
    with pytest.raises(ConfigError, match="model.pretrained"):
        tiny_model([f"model.pretrained={tmp_path / 'missing'}"], trained=False)


def test_shipped_config_builds_the_sharing_model() -> None:
    from pathlib import Path

    config = load_config(Path(__file__).resolve().parents[1] / "configs" / "synthetic_sharing.yaml")
    info = synthetic_info()
    model = build_model(config, info, build_tasks(config.data.tasks, info))
    assert isinstance(model, SharingModel) and model.sub_tasks == ["depth", "normals", "edge"]
    assert len(config.sharing.phase_steps) == 4


@pytest.mark.parametrize("name", ["pascal_sharing", "nyud_sharing"])
def test_paper_scale_configs_build_and_step(name: str) -> None:
    """The paper-scale configs load with their released-code values, build, and train one step of the base
    phase and of the delta phase at a reduced size (sizes overridden here)."""
    from pathlib import Path

    from densemtl.engine.objective import build_objective
    from densemtl.engine.phased import phase_config
    from densemtl.models.sharing.architecture import sharing_phases
    from densemtl.registry import DATASETS

    path = Path(__file__).resolve().parents[1] / "configs" / f"{name}.yaml"
    full = load_config(path)
    assert full.model.backbone_args["hidden_size"] == 768 and full.sharing.gate_init == 5.0
    assert full.sharing.activation_reduction == "sum" and isinstance(full.sharing.l0_weight, dict)
    config = load_config(path, [
        "model.backbone_args={hidden_size: 24, num_hidden_layers: 2, num_attention_heads: 2, intermediate_size: 48,"
        " patch_size: 8}", "data.crop_size=[32, 32]", "model.head_channels=8", "train.amp=none", "train.device=cpu",
    ])
    info = DATASETS.lookup(config.data.dataset).dataset_info(config.data.tasks)
    tasks = build_tasks(config.data.tasks, info, config.loss.normals_loss)
    torch.manual_seed(0)
    model = build_model(config, info, tasks)
    assert model.l0_weights == config.sharing.l0_weight
    assert model.activation_weights == config.sharing.activation_weight
    image = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model.eval()
        targets = {t: tasks[t].predict(raw) for t, raw in model(image)["pred"].items()}
    for phase in sharing_phases(config, model)[:2]:
        phase.enter(model)
        model.train()
        params = phase.parameters(model)
        before = [p.detach().clone() for p in params]
        objective = build_objective(phase_config(config, phase), {t: tasks[t] for t in phase.tasks},
                                    model.feature_channels)
        optimizer = torch.optim.AdamW(params, lr=config.train.lr)
        total, figures = objective(model(image), {"image": image, **targets}, 0, [])
        total.backward()
        optimizer.step()
        assert torch.isfinite(total) and any(not torch.equal(a, p) for a, p in zip(before, params, strict=True))
        assert ("loss/l0" in figures) == (phase.name == "delta")


@pytest.mark.parametrize(("override", "key"), [
    ("sharing.l0_weight={depth: -1.0}", "sharing.l0_weight.depth"),
    ("sharing.activation_weight=.nan", "sharing.activation_weight"),
    ("sharing.threshold=-0.1", "sharing.threshold"),
    ("sharing.gate_temperature=0", "sharing.gate_temperature"),
    ("sharing.gate_init=.inf", "sharing.gate_init"),
    ("sharing.activation_layers=[qkv, attn]", "sharing.activation_layers"),
    ("sharing.base_temporal_steps=-1", "sharing.base_temporal_steps"),
    ("sharing.keyframe_interval=0", "sharing.keyframe_interval"),
    ("sharing.inference=tokens", "sharing.inference"),
    ("data.synthetic.neighbour_offsets=[0, 1]", "data.synthetic.neighbour_offsets"),
    ("data.synthetic.motion=fast", "data.synthetic.motion"),
])
def test_bad_sharing_options_name_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])
