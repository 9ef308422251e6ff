"""Config loading: YAML files, dotted overrides, and errors that name the key and the file."""

from pathlib import Path

import pytest

from densemtl.config import Config, load_config, parse_overrides, to_dict
from densemtl.errors import ConfigError

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
