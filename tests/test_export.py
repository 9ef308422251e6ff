"""The exported model folder and the Python API: ``densemtl export`` writes safetensors, YAML and JSON with the EMA
weights and a model card; ``densemtl.load``, ``predict`` and ``evaluate`` take the folder like the checkpoint;
reading it runs no code from it, and a changed, truncated or missing file is an error naming it."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import densemtl
from densemtl.cli import main
from densemtl.config import load_config, to_dict
from densemtl.constants import IMAGE_MEAN, IMAGE_STD
from densemtl.data import build_dataset
from densemtl.data.synthetic import synthetic_info
from densemtl.data.transforms import normalize_image
from densemtl.engine.checkpoint import info_to_dict, load_checkpoint, load_model, save_checkpoint
from densemtl.engine.model_folder import weights_digest
from densemtl.engine.run import run_training
from densemtl.errors import UserError
from densemtl.models import build_model
from densemtl.tasks import build_tasks
from tests.conftest import TINY, tiny_config, tiny_model

REPO = Path(__file__).resolve().parents[1]
TASKS = ["semseg", "depth", "normals", "edge"]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A 2-step run with EMA weights and a validation (so results.json exists), exported by the CLI."""
    tmp = tmp_path_factory.mktemp("export")
    config = tiny_config(tmp, "train.steps=2", "train.ema_decay=0.5", "train.eval_every=2",
                         "eval.boundary_during_training=false", f"data.tasks=[{','.join(TASKS)}]")
    run_training(config)
    checkpoint = Path(config.out_dir) / "checkpoints" / "last.pt"
    assert main(["export", str(checkpoint), "--out", str(tmp / "model")]) == 0
    return checkpoint, tmp / "model"


@pytest.fixture
def copy(run: tuple[Path, Path], tmp_path: Path) -> Path:
    """A copy of the exported folder that a test may damage."""
    return Path(shutil.copytree(run[1], tmp_path / "model"))


def test_folder_holds_safetensors_yaml_json_and_a_card(run: tuple[Path, Path]) -> None:
    checkpoint, folder = run
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.yaml", "model.safetensors", "tasks.json"]
    for name in ("config.yaml", "tasks.json", "README.md"):  # no pickle anywhere: text, and safetensors
        (folder / name).read_bytes().decode("utf-8")
    assert load_file(folder / "model.safetensors")
    config = yaml.safe_load((folder / "config.yaml").read_text())
    assert set(config) == {"name", "model", "data", "mtcp", "sharing"}  # no train, loss or eval section
    assert config["data"] == {"dataset": "synthetic", "tasks": TASKS, "crop_size": [32, 48]}
    description = json.loads((folder / "tasks.json").read_text())
    assert description["input"]["mean"] == list(IMAGE_MEAN) and description["input"]["std"] == list(IMAGE_STD)
    semseg, depth, normals, edge = description["tasks"]
    assert [t["name"] for t in description["tasks"]] == TASKS
    assert len(semseg["class_names"]) == len(semseg["colours"]) == semseg["channels"] > 2
    assert "metres" in depth["prediction"] and normals["channels"] == 3 and "probability" in edge["prediction"]
    card = (folder / "README.md").read_text()
    results = json.loads((checkpoint.parents[1] / "results.json").read_text())
    miou = results["results"]["semseg"]["mIoU"]
    assert f"| semseg | mIoU | {miou:.4g} |" in card and "densemtl.load(" in card


def test_folder_weights_are_the_ema_weights(run: tuple[Path, Path]) -> None:
    checkpoint, folder = run
    state = load_checkpoint(checkpoint)
    weights = load_file(folder / "model.safetensors")
    assert weights.keys() == state["ema"]["model"].keys()
    assert all(torch.equal(weights[k], state["ema"]["model"][k]) for k in weights)
    assert not all(torch.equal(weights[k], state["model"][k]) for k in weights)
    assert "EMA weights after 2 training steps" in (folder / "README.md").read_text()


def test_load_predicts_in_natural_units_like_the_checkpoint(run: tuple[Path, Path]) -> None:
    checkpoint, folder = run
    from_folder, from_checkpoint = densemtl.load(folder), densemtl.load(checkpoint, device="cpu")
    assert list(from_folder.tasks) == TASKS and from_folder.device == torch.device("cpu")
    rgb = np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)  # not the training size
    outputs = from_folder.predict(Image.fromarray(rgb))
    expected = from_checkpoint.predict(rgb)
    for name in TASKS:
        np.testing.assert_array_equal(outputs[name], expected[name])
    semseg, depth, normals, edge = (outputs[name] for name in TASKS)
    assert semseg.shape == depth.shape == edge.shape == (37, 53) and normals.shape == (37, 53, 3)
    assert semseg.dtype == np.int64 and 0 <= semseg.min() and semseg.max() < from_folder.tasks["semseg"].num_classes
    np.testing.assert_allclose(np.linalg.norm(normals, axis=-1), 1, atol=1e-5)
    assert 0 <= edge.min() and edge.max() <= 1 and depth.dtype == np.float32
    with torch.no_grad():  # metres: the depth head's raw output, unchanged
        raw = load_model(checkpoint).model(normalize_image(rgb)[None])["pred"]
    np.testing.assert_allclose(depth, raw["depth"][0, 0].numpy(), atol=1e-6)
    np.testing.assert_array_equal(from_folder.predict(rgb.astype(np.float32) / 255)["semseg"], semseg)


@pytest.mark.parametrize("image", [np.zeros((4, 5, 6), np.uint8), np.zeros((1, 4, 5, 3)), np.full((4, 5, 3), 2.0),
                                   "image.png", np.full((4, 5, 3), np.nan)])
def test_predict_rejects_what_is_not_an_image(run: tuple[Path, Path], image: object) -> None:
    with pytest.raises(UserError, match="predict: expected"):
        densemtl.load(run[1]).predict(image)


def test_predict_and_evaluate_take_the_folder(run: tuple[Path, Path], tmp_path: Path) -> None:
    checkpoint, folder = run
    frame = build_dataset(load_model(checkpoint).config.data, "val", train=False).arrays["image"][0]
    Image.fromarray(frame).save(tmp_path / "frame.png")
    for source, out in ((checkpoint, "by_checkpoint"), (folder, "by_folder")):
        assert main(["predict", "--checkpoint", str(source), str(tmp_path / "frame.png"),
                     "--out", str(tmp_path / out)]) == 0
    for name in ("semseg/frame.png", "depth/frame.npy", "normals/frame.png", "edge/frame.png", "panels/frame.png"):
        assert (tmp_path / "by_folder" / name).read_bytes() == (tmp_path / "by_checkpoint" / name).read_bytes()
    run_config = str(checkpoint.parents[1] / "config.yaml")  # the folder keeps no data settings but the tasks
    figures = {}
    for source, out in ((checkpoint, "checkpoint.json"), (folder, "folder.json")):
        argv = ["evaluate", "--checkpoint", str(source), "--data", run_config, "--out", str(tmp_path / out)]
        assert main(argv) == 0
        figures[out] = json.loads((tmp_path / out).read_text())["results"]
    assert figures["folder.json"] == figures["checkpoint.json"] and set(figures["folder.json"]) == set(TASKS)


def test_reexporting_a_folder_keeps_it_and_export_refuses_a_folder_of_other_files(
    run: tuple[Path, Path], tmp_path: Path
) -> None:
    checkpoint, folder = run
    assert main(["export", str(folder), "--out", str(tmp_path / "again")]) == 0
    for name in ("config.yaml", "tasks.json", "README.md"):
        assert (tmp_path / "again" / name).read_bytes() == (folder / name).read_bytes(), name
    assert metadata_of(tmp_path / "again") == metadata_of(folder)  # the same weights, step and figures
    assert main(["export", str(checkpoint), "--out", str(tmp_path / "again")]) == 0  # an earlier export: replaced
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="notes.txt"):
        densemtl.engine.export.export_model(checkpoint, tmp_path)


def metadata_of(folder: Path) -> dict[str, str]:
    with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
        return dict(handle.metadata())


def reseal(folder: Path) -> None:
    """Record the folder's current file hashes in the weights file, as someone forging a folder would."""
    metadata = metadata_of(folder)
    for name in ("config.yaml", "tasks.json"):
        metadata[f"sha256.{name}"] = hashlib.sha256((folder / name).read_bytes()).hexdigest()
    weights = load_file(folder / "model.safetensors")
    metadata["checksum.weights"] = weights_digest(weights)
    save_file(weights, folder / "model.safetensors", metadata=metadata)


def test_loading_a_folder_never_runs_code_from_it(copy: Path, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    config = (copy / "config.yaml").read_text()
    payload = f"!!python/object/apply:os.system ['touch {marker}']"
    (copy / "config.yaml").write_text(config.replace("arch: multitask", f"arch: {payload}"))
    reseal(copy)
    with pytest.raises(UserError, match=re.escape(f"{copy / 'config.yaml'}: cannot be parsed")):
        densemtl.load(copy)
    assert not marker.exists()


def damage_weights(folder: Path, how: str) -> None:
    path = folder / "model.safetensors"
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    else:  # one weight byte changed
        path.write_bytes(data[:-100] + bytes([data[-100] ^ 0xFF]) + data[-99:])


@pytest.mark.parametrize(("damage", "file", "why"), [
    (lambda f: damage_weights(f, "truncated"), "model.safetensors", "not a readable safetensors file"),
    (lambda f: damage_weights(f, "flipped"), "model.safetensors", "the weights changed since export"),
    (lambda f: (f / "config.yaml").write_text((f / "config.yaml").read_text().replace("16", "32")), "config.yaml",
     "changed since export"),
    (lambda f: (f / "tasks.json").unlink(), "tasks.json", "missing"),
    (lambda f: ((f / "tasks.json").write_text((f / "tasks.json").read_text()[:200]), reseal(f)), "tasks.json",
     "cannot be parsed"),
    (lambda f: ((f / "config.yaml").write_text((f / "config.yaml").read_text().replace("neck_channels: 16",
                                                                                       "neck_channels: 32")),
                reseal(f)), "model.safetensors", "weights do not fit"),
    (lambda f: (f / "model.safetensors").unlink(), "", "not an exported densemtl model folder"),
])
def test_a_damaged_folder_is_an_error_naming_the_file(copy: Path, damage: object, file: str, why: str,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    damage(copy)
    with pytest.raises(UserError, match=why) as caught:
        densemtl.load(copy)
    assert str(copy / file) in str(caught.value) and "\n" not in str(caught.value)
    assert main(["predict", "--checkpoint", str(copy), "x.png", "--out", str(copy.parent / "out")]) == 2
    assert why in capsys.readouterr().err


def test_readme_snippet_runs(run: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The Python API example of README.md, as written, on an exported demo folder and a photo."""
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Python API"):]
    snippet = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    (tmp_path / "runs" / "demo").mkdir(parents=True)
    shutil.copytree(run[1], tmp_path / "runs" / "demo" / "model")
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (61, 83, 3), dtype=np.uint8)).save(tmp_path / "photo.jpg")
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        namespace: dict[str, object] = {}
        exec(compile(snippet, "README.md", "exec"), namespace)  # noqa: S102 - the documented example itself
    finally:
        os.chdir(cwd)
    outputs = namespace["outputs"]
    assert set(outputs) == set(TASKS) and outputs["semseg"].shape == (61, 83)
    assert "semseg" in capsys.readouterr().out


def export_untrained(tmp_path: Path, overrides: list[str]) -> Path:
    """A checkpoint of the architecture ``overrides`` choose (random weights), exported to ``tmp_path/model``."""
    config = load_config(None, ["model.neck_channels=16", "model.head_channels=16", "data.synthetic.height=32",
                                "data.synthetic.width=48", *overrides])
    torch.manual_seed(0)
    tasks = build_tasks(config.data.tasks, synthetic_info())
    model = tiny_model(overrides) if config.model.arch == "sharing" else build_model(config, synthetic_info(), tasks)
    checkpoint = save_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt", {
        "config": to_dict(config), "info": info_to_dict(synthetic_info()), "model": model.state_dict(),
        "ema": None, "step": 3})
    assert main(["export", str(checkpoint), "--out", str(tmp_path / "model")]) == 0
    return checkpoint


@pytest.mark.parametrize("overrides", [
    ["model.arch=single", "data.tasks=[semseg,depth]"],
    ["model.arch=mtcp", "data.tasks=[semseg,normals]", "mtcp.consistency_weight=0.1"],  # adds projectors
    TINY + ["sharing.threshold=0.05"],
], ids=["single", "mtcp", "sharing"])
def test_every_architecture_round_trips_through_a_folder(tmp_path: Path, overrides: list[str]) -> None:
    """The folder rebuilds each architecture as its checkpoint does (method settings, the sharing model's
    position grid from the training size) and predicts through its deployed form."""
    checkpoint = export_untrained(tmp_path, overrides)
    rgb = np.random.default_rng(2).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    from_folder, from_checkpoint = densemtl.load(tmp_path / "model"), densemtl.load(checkpoint)
    assert type(from_folder.network) is type(from_checkpoint.network)
    expected = from_checkpoint.predict(rgb)
    for name, array in from_folder.predict(rgb).items():
        np.testing.assert_array_equal(array, expected[name])
    assert "No training figures" in (tmp_path / "model" / "README.md").read_text()


def test_predict_video_takes_a_sharing_folder(tmp_path: Path) -> None:
    """``predict --video`` (frame-to-frame reuse, the sharing model's settings) writes from the folder what it
    writes from the checkpoint."""
    checkpoint = export_untrained(tmp_path, [*TINY, "sharing.threshold=0.05", "sharing.temporal_threshold=0.1"])
    frames = tmp_path / "frames"
    frames.mkdir()
    rgb = np.random.default_rng(3).integers(0, 256, (32, 48, 3), dtype=np.uint8)
    for index in range(3):  # a slowly changing scene, so that later frames reuse tokens
        Image.fromarray(np.roll(rgb, index, axis=1)).save(frames / f"{index:03d}.png")
    for source, out in ((checkpoint, "by_checkpoint"), (tmp_path / "model", "by_folder")):
        assert main(["predict", "--checkpoint", str(source), str(frames), "--out", str(tmp_path / out), "--video"]) == 0
    written = sorted(p.relative_to(tmp_path / "by_folder") for p in (tmp_path / "by_folder").rglob("*.*")
                     if p.name != "video_report.json")
    assert sum(path.parts[0] in ("semseg", "depth", "edge") for path in written) == 9  # 3 tasks x 3 frames
    for name in written:
        assert (tmp_path / "by_folder" / name).read_bytes() == (tmp_path / "by_checkpoint" / name).read_bytes(), name
    report = json.loads((tmp_path / "by_folder" / "video_report.json").read_text())
    assert report["temporal_threshold"] == 0.1 and report["frames"] == 3


def test_load_names_a_device_it_cannot_use(run: tuple[Path, Path]) -> None:
    for device in ("bogus", "cuda:7"):
        with pytest.raises(UserError, match=f"device '{device}'"):
            densemtl.load(run[1], device=device)
