"""ONNX export: every architecture's graph run by onnxruntime equals PyTorch at two input sizes, has dynamic
N/H/W and its opset in the metadata; a model that cannot be exported is an error naming the line or operator.

Each architecture is exported once per session, tiny, two at a time in worker processes (an export is
seconds of single-threaded tracing); the multi-task case goes through ``densemtl export`` on a checkpoint.
"""

from __future__ import annotations

import json
import multiprocessing
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
import onnx  # noqa: E402
import onnxruntime  # noqa: E402

from densemtl.cli import main  # noqa: E402
from densemtl.config import load_config  # noqa: E402
from densemtl.data.synthetic import synthetic_info  # noqa: E402
from densemtl.engine.checkpoint import LoadedModel, load_model  # noqa: E402
from densemtl.engine.onnx_export import OPSET, adaptive_avg_pool2d, export_onnx  # noqa: E402
from densemtl.errors import UserError  # noqa: E402
from densemtl.models import build_model  # noqa: E402
from densemtl.models.architecture import Architecture  # noqa: E402
from densemtl.models.output import ModelOutput  # noqa: E402
from densemtl.registry import ARCHITECTURES  # noqa: E402
from densemtl.tasks import Task, build_tasks  # noqa: E402
from tests.conftest import TINY, make_trainer, tiny_config, tiny_model  # noqa: E402

SMALL = ["model.neck_channels=16", "model.head_channels=16", "data.synthetic.height=32", "data.synthetic.width=48"]
CASES = {  # built from random weights; the multi-task case is exported from a trained checkpoint by the CLI
    "single": ["model.arch=single", "data.tasks=[semseg,depth]", *SMALL],
    "mtcp": ["model.arch=mtcp", "data.tasks=[semseg,normals]", *SMALL],
    "sharing": TINY,
}
SIZES = ((1, 96, 128), (2, 50, 70))  # (N, H, W): a multiple of 32 and an odd size, neither the traced one
TOLERANCE = 1e-4


def random_model(name: str) -> LoadedModel:
    """The case's tiny model with weights drawn so that no path is idle: BatchNorm statistics away from
    (0, 1) and no parameter left at zero (MT-CP's fusion scale starts at 0). Deterministic."""
    if name == "sharing":
        model, config = tiny_model(), load_config(None, TINY)
    else:
        torch.manual_seed(0)
        config = load_config(None, CASES[name])
        model = build_model(config, synthetic_info(), build_tasks(config.data.tasks, synthetic_info()))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)
        for param in model.parameters():
            if not param.any():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return LoadedModel(model.eval(), model.tasks, config, synthetic_info(), 0)


def export_case(job: tuple[str, str]) -> str:
    """Worker: export one case to ``folder/model.onnx`` (``name`` a CASES key, or a checkpoint path for the CLI)."""
    torch.set_num_threads(1)
    name, folder = job
    if Path(name).is_file():
        assert main(["export", name, "--out", folder, "--format", "onnx"]) == 0
    else:
        export_onnx(random_model(name), Path(folder) / "model.onnx", {"tasks": []})
    return str(Path(folder) / "model.onnx")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("onnx_run")
    config = tiny_config(tmp, "train.steps=2")
    make_trainer(config).fit()
    return Path(config.out_dir) / "checkpoints" / "last.pt"


@pytest.fixture(scope="module")
def graphs(tmp_path_factory: pytest.TempPathFactory, checkpoint: Path) -> dict[str, Path]:
    """Every case's ONNX file (the multi-task one as ``densemtl export`` writes it)."""
    tmp = tmp_path_factory.mktemp("onnx")
    jobs = {"mtcp": "mtcp", "multitask": str(checkpoint), "single": "single", "sharing": "sharing"}
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=2, mp_context=context) as pool:
        paths = pool.map(export_case, [(job, str(tmp / name)) for name, job in jobs.items()])
        return {name: Path(path) for name, path in zip(jobs, paths, strict=True)}


def reference(name: str, checkpoint: Path) -> LoadedModel:
    return load_model(checkpoint) if name == "multitask" else random_model(name)


def assert_equal_outputs(tasks: dict[str, Task], raw: dict[str, torch.Tensor], outputs: list[np.ndarray]) -> None:
    """Real-valued predictions within TOLERANCE; class ids equal wherever PyTorch's best logit leads the
    runner-up by more than TOLERANCE (where it does not, either id is the same answer)."""
    for (name, task), output in zip(tasks.items(), outputs, strict=True):
        expected = task.predict(raw[name])
        got = torch.from_numpy(output)
        assert got.shape == expected.shape, name
        if expected.is_floating_point():
            assert float((got - expected).abs().max()) <= TOLERANCE, name
            assert float(expected.abs().max()) > 0.01, f"{name}: an all-zero output proves nothing"
        else:
            top2 = raw[name].topk(2, dim=1).values
            decided = (top2[:, 0] - top2[:, 1]) > TOLERANCE
            assert torch.equal(got[decided], expected[decided]), name
            assert decided.float().mean() > 0.99


@pytest.mark.parametrize("name", ["multitask", "single", "mtcp", "sharing"])
def test_onnxruntime_matches_pytorch_at_two_sizes(graphs: dict[str, Path], checkpoint: Path, name: str) -> None:
    loaded = reference(name, checkpoint)
    session = onnxruntime.InferenceSession(str(graphs[name]), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == list(loaded.tasks)
    generator = torch.Generator().manual_seed(2)
    for batch, height, width in SIZES:
        image = torch.randn(batch, 3, height, width, generator=generator)
        with torch.no_grad():
            network = ARCHITECTURES[loaded.config.model.arch].exported(loaded.model, loaded.config)
            raw = network(image)["pred"]
        assert_equal_outputs(loaded.tasks, raw, session.run(None, {"image": image.numpy()}))


def test_sharing_graph_holds_the_dense_sub_tasks(graphs: dict[str, Path]) -> None:
    """The sharing model's eval-mode forward (every sub-task dense) is what the exported form computes."""
    loaded = random_model("sharing")
    image = torch.randn(1, 3, 40, 56)
    dense = ARCHITECTURES["sharing"].exported(loaded.model, loaded.config)
    with torch.no_grad():
        expected, got = loaded.model(image)["pred"], dense(image)["pred"]
    for name in loaded.tasks:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-6)
    form = {p.key: p.value for p in onnx.load(str(graphs["sharing"])).metadata_props}["exported_form"]
    assert "densely" in form


def test_graph_has_dynamic_sizes_opset_metadata_and_the_folder_files(graphs: dict[str, Path]) -> None:
    model = onnx.load(str(graphs["multitask"]))
    metadata = {p.key: p.value for p in model.metadata_props}
    default_opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    assert metadata["opset"] == str(OPSET) == str(default_opset)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims][1] == 3
    assert all(dims[i].dim_param for i in (0, 2, 3)), "batch, height and width must be symbolic"
    parity = json.loads(metadata["parity_max_abs"])
    assert len(parity) == 2 and all(v <= TOLERANCE for size in parity.values() for v in size.values())
    folder = graphs["multitask"].parent
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "model.onnx", "tasks.json"]
    description = json.loads((folder / "tasks.json").read_text())
    assert json.loads(metadata["tasks"]) == description
    assert [t["name"] for t in description["tasks"]] == ["semseg", "depth", "normals", "edge"]
    assert "onnxruntime.InferenceSession" in (folder / "README.md").read_text()


def test_size_generic_pooling_equals_adaptive_average_pooling() -> None:
    x = torch.randn(2, 4, 37, 53)
    for size in [(7, 11), 5, (37, None), 1]:
        torch.testing.assert_close(adaptive_avg_pool2d(x, size), nn.functional.adaptive_avg_pool2d(x, size))


class BranchOnValues(nn.Module):
    """Decides its control flow from tensor contents, which a static graph cannot hold."""

    def __init__(self, tasks: dict[str, Task]) -> None:
        super().__init__()
        self.tasks = dict(tasks)
        self.head = nn.Conv2d(3, 1, 1)
        self.feature_channels = dict.fromkeys(tasks, 1)

    def forward(self, image: torch.Tensor) -> ModelOutput:
        out = self.head(image)
        if out.mean() > 0:
            out = -out
        return {"pred": {"depth": out}}


class NoOnnxOperator(BranchOnValues):
    """Uses an operator onnxscript has no translation for."""

    def forward(self, image: torch.Tensor) -> ModelOutput:
        return {"pred": {"depth": torch.digamma(self.head(image).abs() + 1)}}


@pytest.fixture
def toy_architectures() -> Iterator[None]:
    for name, cls in (("toy_branch", BranchOnValues), ("toy_digamma", NoOnnxOperator)):
        ARCHITECTURES.register(name, Architecture(build=lambda config, info, tasks, cls=cls: cls(tasks)))
    yield
    for name in ("toy_branch", "toy_digamma"):
        ARCHITECTURES.unregister(name)


@pytest.mark.parametrize(("arch", "names"), [
    ("toy_branch", ["test_onnx_export.py", "BranchOnValues.forward", "if out.mean() > 0"]),
    ("toy_digamma", ["digamma", "NoOnnxOperator", "No ONNX function"]),
])
def test_a_model_that_cannot_be_exported_is_named(
    toy_architectures: None, tmp_path: Path, arch: str, names: list[str]
) -> None:
    config = load_config(None, [f"model.arch={arch}", "data.tasks=[depth]"])
    tasks = build_tasks(["depth"], synthetic_info())
    loaded = LoadedModel(build_model(config, synthetic_info(), tasks).eval(), tasks, config, synthetic_info(), 0)
    with pytest.raises(UserError, match=f"cannot export model.arch '{arch}' to ONNX") as caught:
        export_onnx(loaded, tmp_path / "model.onnx", {"tasks": []})
    message = str(caught.value)
    assert "\n" not in message and all(name in message for name in names), message
    assert not (tmp_path / "model.onnx").exists()
