"""Backbones, the FPN decoder and the baseline models: shapes, gradients, pretrained loading, errors."""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

import pytest
import torch

from densemtl.config import Config, ModelConfig, load_config
from densemtl.dataset_info import DatasetInfo
from densemtl.errors import ConfigError
from densemtl.models import build_model
from densemtl.models.backbones import FAMILIES, PRESETS, build_backbone
from densemtl.models.decoders import resize_to_input
from densemtl.tasks import build_tasks
from tests.conftest import TINY_ARGS

NYUD = DatasetInfo("nyud", ("semseg", "depth", "normals", "edge"), num_classes={"semseg": 40})
PASCAL = DatasetInfo(
    "pascal", ("semseg", "human_parts", "saliency", "normals", "edge"), num_classes={"semseg": 21, "human_parts": 7}
)
SYNTHETIC = DatasetInfo("synthetic", ("semseg", "depth", "normals", "edge", "saliency"), num_classes={"semseg": 8})
SMALL = {"neck_channels": 16, "head_channels": 16}
ROOT = Path(__file__).resolve().parents[1]


def test_every_family_has_tiny_test_args() -> None:
    assert set(TINY_ARGS) == set(FAMILIES)


@pytest.mark.parametrize("name", sorted(TINY_ARGS))
@pytest.mark.parametrize("size", [(64, 96), (50, 90)])
def test_backbone_forward_backward_non_square(name: str, size: tuple[int, int]) -> None:
    torch.manual_seed(0)
    backbone = build_backbone(ModelConfig(backbone=name, backbone_args=TINY_ARGS[name]))
    image = torch.randn(2, 3, *size, requires_grad=True)
    features = backbone(image)
    padded = [-(-s // 32) * 32 for s in size]
    assert [f.shape[1] for f in features] == backbone.channels
    assert [tuple(f.shape[-2:]) for f in features] == [(padded[0] // s, padded[1] // s) for s in (4, 8, 16, 32)]
    sum(f.square().mean() for f in features).backward()
    # Every trainable parameter takes part (DDP needs no find_unused_parameters).
    unused = [key for key, p in backbone.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused, f"{name}: parameters without a gradient: {unused}"
    nonzero = sum(bool(p.grad.abs().sum() > 0) for p in backbone.parameters() if p.requires_grad)
    assert nonzero >= 0.9 * sum(p.requires_grad for p in backbone.parameters())
    assert image.grad is not None and image.grad.abs().sum() > 0


def test_vit_feature_layers_choose_blocks() -> None:
    args = TINY_ARGS["vit"]
    backbone = build_backbone(ModelConfig(backbone="vit", backbone_args=args, feature_layers=[1, 1, 2, 2]))
    assert backbone.layers == [1, 1, 2, 2]
    assert build_backbone(ModelConfig(backbone="vit", backbone_args=args)).layers == [1, 2, 3, 4]
    with pytest.raises(ConfigError, match="model.feature_layers"):
        build_backbone(ModelConfig(backbone="vit", backbone_args=args, feature_layers=[1, 2, 3, 5]))


def test_presets_build_their_family() -> None:
    backbone = build_backbone(ModelConfig(backbone="resnet-tiny"))
    assert backbone.channels == PRESETS["resnet-tiny"][1]["hidden_sizes"]
    assert type(backbone.model).__name__ == "ResNetBackbone"


def test_unknown_backbone_names_the_key_and_lists_names() -> None:
    with pytest.raises(ConfigError, match="model.backbone") as err:
        build_backbone(ModelConfig(backbone="resnet-9000"))
    for name in ("resnet", "vit", "dinov2", "swin", "resnet-tiny"):
        assert name in str(err.value)


def test_unknown_backbone_arg_is_rejected() -> None:
    with pytest.raises(ConfigError, match="model.backbone_args: hiden_sizes"):
        build_backbone(ModelConfig(backbone="resnet", backbone_args={"hiden_sizes": [8, 8, 8, 8]}))


def test_pretrained_folder_round_trip(tmp_path) -> None:
    """A classification checkpoint written by save_pretrained loads into the backbone, weights equal."""
    import transformers

    torch.manual_seed(0)
    config = transformers.ResNetConfig(**TINY_ARGS["resnet"], num_labels=5)
    source = transformers.ResNetForImageClassification(config)
    source.save_pretrained(tmp_path / "resnet")
    backbone = build_backbone(ModelConfig(backbone="resnet", pretrained=str(tmp_path / "resnet")))
    loaded = backbone.model.state_dict()
    expected = {k.removeprefix("resnet."): v for k, v in source.state_dict().items() if k.startswith("resnet.")}
    shared = set(expected) & set(loaded)
    assert len(shared) >= 0.9 * len(loaded)
    for key in shared:
        assert torch.equal(loaded[key], expected[key]), key

    vit = transformers.Dinov2Model(transformers.Dinov2Config(**TINY_ARGS["dinov2"]))
    vit.save_pretrained(tmp_path / "dinov2")
    backbone = build_backbone(ModelConfig(backbone="dinov2", pretrained=str(tmp_path / "dinov2")))
    for key, value in vit.state_dict().items():
        assert torch.equal(backbone.model.state_dict()[key], value), key


def test_missing_pretrained_folder_is_a_config_error(tmp_path) -> None:
    with pytest.raises(ConfigError, match="model.pretrained"):
        build_backbone(ModelConfig(backbone="resnet", pretrained=str(tmp_path / "nothing")))


def test_resize_to_input_crops_the_padding() -> None:
    x = torch.arange(4.0).reshape(1, 1, 2, 2).repeat_interleave(16, 2).repeat_interleave(16, 3)
    out = resize_to_input(x[..., ::4, ::4], (20, 31))
    assert out.shape[-2:] == (20, 31)
    assert out[0, 0, 0, 0] == 0 and out[0, 0, 0, -1] == 1 and out[0, 0, -1, 0] == 2


@pytest.mark.parametrize("info", [SYNTHETIC, NYUD, PASCAL], ids=lambda info: info.name)
@pytest.mark.parametrize("arch", ["multitask", "single"])
def test_model_output_shapes(info: DatasetInfo, arch: str) -> None:
    config = Config(model=ModelConfig(arch=arch, backbone="resnet", backbone_args=TINY_ARGS["resnet"], **SMALL))
    tasks = build_tasks(list(info.tasks), info)
    model = build_model(config, info, tasks)
    assert model.tasks == tasks
    out = model(torch.randn(2, 3, 72, 100))
    assert set(out["pred"]) == set(out["features"]) == set(info.tasks)
    for name, task in tasks.items():
        assert out["pred"][name].shape == (2, task.channels, 72, 100)
        # decoder features cover the image itself at stride 4, not the padding to a multiple of 32
        assert out["features"][name].shape == (2, model.feature_channels[name], 18, 25)
    expected = {"semseg": info.num_classes["semseg"], "depth": 1, "normals": 3, "edge": 1, "saliency": 1}
    expected["human_parts"] = 7
    assert {name: out["pred"][name].shape[1] for name in tasks} == {name: expected[name] for name in tasks}


def test_multitask_shares_the_backbone_and_single_does_not() -> None:
    backbone = {"backbone": "resnet", "backbone_args": TINY_ARGS["resnet"], **SMALL}
    tasks = build_tasks(list(NYUD.tasks), NYUD)
    multi = build_model(Config(model=ModelConfig(arch="multitask", **backbone)), NYUD, tasks)
    single = build_model(Config(model=ModelConfig(arch="single", **backbone)), NYUD, tasks)
    multi_backbone = sum(p.numel() for p in multi.backbone.parameters())
    assert sum(p.numel() for p in single.parameters()) - sum(p.numel() for p in multi.parameters()) == pytest.approx(
        3 * (multi_backbone + sum(p.numel() for p in multi.neck.parameters()))
    )
    image = torch.randn(2, 3, 64, 64)
    out = single(image)
    for name in tasks:
        assert torch.equal(out["pred"][name], single.networks[name](image)["pred"][name])


def test_unknown_arch_is_a_config_error() -> None:
    config = Config()
    config.model.arch = "tower"
    with pytest.raises(ConfigError, match="model.arch"):
        build_model(config, NYUD, build_tasks(list(NYUD.tasks), NYUD))


def test_model_trains_on_a_fixed_batch() -> None:
    """A few Adam steps on one batch lower every task's loss (the model can learn, gradients flow)."""
    torch.manual_seed(0)
    tasks = build_tasks(list(NYUD.tasks), NYUD)
    config = Config(model=ModelConfig(backbone="resnet", backbone_args=TINY_ARGS["resnet"], **SMALL))
    model = build_model(config, NYUD, tasks)
    image = torch.randn(2, 3, 32, 48)
    targets = {
        "semseg": torch.randint(0, 40, (2, 32, 48)),
        "depth": torch.rand(2, 1, 32, 48) + 0.5,
        "normals": torch.nn.functional.normalize(torch.randn(2, 3, 32, 48), dim=1),
        "edge": (torch.rand(2, 1, 32, 48) > 0.8).float(),
    }
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)

    def losses() -> dict[str, torch.Tensor]:
        pred = model(image)["pred"]
        return {name: task.loss(pred[name], targets[name]) for name, task in tasks.items()}

    first = {name: value.item() for name, value in losses().items()}
    for _ in range(15):
        optimizer.zero_grad()
        sum(losses().values()).backward()
        optimizer.step()
    last = {name: value.item() for name, value in losses().items()}
    assert all(last[name] < first[name] for name in tasks), (first, last)


def test_every_backbone_named_in_the_readme_builds_with_its_defaults() -> None:
    """The README's examples as a user types them: no ``backbone_args`` (the tiny test arguments above once
    hid a ConvNeXt failure under ``transformers`` 5, whose defaults are tuples)."""
    names = sorted(set(re.findall(r"model\.backbone=([\w.-]+)", (ROOT / "README.md").read_text())))
    assert "convnext" in names
    for name in names:
        config = load_config(None, [f"model.backbone={name}", "data.tasks=[semseg,depth]"])
        model = build_model(config, SYNTHETIC, build_tasks(config.data.tasks, SYNTHETIC))
        with torch.no_grad():
            pred = model(torch.zeros(1, 3, 32, 48))["pred"]
        assert {task: tuple(value.shape) for task, value in pred.items()} == {
            "semseg": (1, 8, 32, 48), "depth": (1, 1, 32, 48)}, name


def test_runtime_dependencies_are_bounded_to_the_major_versions_tested() -> None:
    tomllib = pytest.importorskip("tomllib")
    requirements = pytest.importorskip("packaging.requirements")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for line in project["dependencies"]:
        requirement = requirements.Requirement(line)
        assert any(spec.operator == "<" for spec in requirement.specifier), f"{line}: no upper bound"
        installed = importlib.metadata.version(requirement.name)
        assert requirement.specifier.contains(installed, prereleases=True), f"{line}: installed {installed}"
