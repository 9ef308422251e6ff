"""Config loading: YAML files, dotted overrides, and errors that name the key and the file."""

import dataclasses
import math
import types
import typing
from pathlib import Path

import pytest
import yaml

from densemtl.cli import main
from densemtl.config import RANGES, Config, load_config, parse_overrides, to_dict
from densemtl.errors import ConfigError
from tests.conftest import tiny_config

REPO = Path(__file__).resolve().parents[1]


def test_defaults_and_overrides_are_typed():
    config = load_config(None, ["train.lr=1e-4", "data.tasks=[semseg,depth]", "train.grad_clip=null"])
    assert isinstance(config, Config)
    assert config.train.lr == pytest.approx(1e-4)
    assert config.data.tasks == ["semseg", "depth"]
    assert config.train.grad_clip is None


def test_integer_accepted_where_a_float_is_expected():
    assert load_config(None, ["train.lr=1"]).train.lr == 1.0


def test_base_file_is_merged(tmp_path):
    (tmp_path / "base.yaml").write_text("train:\n  lr: 0.5\n  steps: 7\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\ntrain:\n  steps: 9\n")
    config = load_config(tmp_path / "child.yaml")
    assert (config.train.lr, config.train.steps) == (0.5, 9)


@pytest.mark.parametrize(
    "text, needle",
    [
        ("train:\n  lrr: 1\n", "train.lrr"),
        ("train:\n  lr: fast\n", "train.lr"),
        ("train:\n  amp: fp8\n", "train.amp"),
        ("data:\n  tasks: [semseg, sky]\n", "sky"),
        ("data:\n  batch_size: 0\n", "data.batch_size"),
        ("model: 3\n", "model"),
        ("- a\n- b\n", "mapping"),
        ("train: [\n", "not valid YAML"),
    ],
)
def test_bad_values_name_key_and_file(tmp_path, text, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert needle in str(info.value)
    assert str(path) in str(info.value)


def test_missing_file_and_bad_override():
    with pytest.raises(ConfigError, match="not found"):
        load_config("/nonexistent/config.yaml")
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["train.lr"])


def test_every_shipped_config_loads():
    configs = sorted((REPO / "configs").glob("*.yaml"))
    assert configs, "configs/ holds no YAML file"
    for path in configs:
        config = load_config(path, ["data.root=/datasets/any"])
        assert to_dict(config)["data"]["tasks"]


def _number_shape(tp: object) -> str | None:
    """``scalar``, ``list`` or ``mapping`` for an annotation holding ints or floats, else None."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return next((shape for arg in args if arg is not type(None) and (shape := _number_shape(arg))), None)
    if origin is list and _number_shape(args[0]):
        return "list"
    if origin is dict and _number_shape(args[1]):
        return "mapping"
    return "scalar" if tp in (int, float) else None


def numeric_fields(cls: type = Config, prefix: str = "") -> dict[str, str]:
    """Every int or float field of the config dataclasses (inside lists and mappings too): dotted key -> shape."""
    fields: dict[str, str] = {}
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        tp = hints[field.name]
        if dataclasses.is_dataclass(tp):
            fields.update(numeric_fields(tp, f"{prefix}{field.name}."))
        elif shape := _number_shape(tp):
            fields[f"{prefix}{field.name}"] = shape
    return fields


def _yaml(value: float) -> str:
    if math.isnan(value):
        return ".nan"
    return (".inf" if value > 0 else "-.inf") if math.isinf(value) else repr(value)


def test_every_numeric_option_has_a_range_that_refuses_nan_infinity_and_values_outside():
    fields = numeric_fields()
    assert set(fields) == set(RANGES), "a numeric config field without a row in densemtl.config.RANGES"
    for key, shape in fields.items():
        bounds = RANGES[key]
        bad = [float("nan"), float("inf"), float("-inf")]
        if bounds.low is not None:
            bad.append(bounds.low if bounds.open_low else bounds.low - 1)
        if bounds.high is not None:
            bad.append(bounds.high if bounds.open_high else bounds.high + 1)
        for value in bad:
            text = _yaml(value)
            override = {"scalar": text, "list": f"[{text}, {text}]", "mapping": f"{{semseg: {text}}}"}[shape]
            with pytest.raises(ConfigError) as info:
                load_config(None, [f"{key}={override}"])
            assert f"'{key}" in str(info.value), f"{key}={override}: {info.value}"


@pytest.mark.parametrize(
    "override, needle",
    [
        ("train.grad_clip=-1", "must be > 0"),  # a negative clip would flip every gradient
        ("train.lr=nan", "must be > 0, got nan"),
        ("train.lr=inf", "got inf"),
        ("train.weight_decay=-0.1", "must be >= 0"),
        ("train.warmup_steps=-5", "must be >= 0"),
        ("contrastive.depth_positive=0.5", "contrastive.depth_negative"),
        ("loss.balancer_args={alpha: .nan}", "loss.balancer_args.alpha"),
    ],
)
def test_bad_numbers_exit_2_with_one_line_naming_the_key(tmp_path, capsys, override, needle):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(to_dict(tiny_config(tmp_path, "train.steps=1"))))
    assert main(["train", str(config), override, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert needle in err and override.split("=")[0] in err and len(err.strip().splitlines()) == 1


def test_null_grad_clip_and_boundary_distance_stay_allowed():
    config = load_config(None, ["train.grad_clip=null", "eval.boundary_max_dist=null", "mtcp.attention_size=null"])
    assert config.train.grad_clip is None and config.eval.boundary_max_dist is None


def test_base_cycles_are_named(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\ntrain:\n  steps: 2\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle") as info:
        load_config(tmp_path / "a.yaml")
    assert str(info.value).count("a.yaml") == 3 and "b.yaml" in str(info.value)
    (tmp_path / "self.yaml").write_text("base: ./self.yaml\n")
    with pytest.raises(ConfigError, match="self.yaml -> .*self.yaml"):
        load_config(tmp_path / "self.yaml")
    (tmp_path / "number.yaml").write_text("base: 3\n")
    with pytest.raises(ConfigError, match="key 'base'"):
        load_config(tmp_path / "number.yaml")
