"""ONNX export: one graph from ``image`` (N x 3 x H x W, normalised as ``tasks.json`` says; any N, H and W) to
one output per task, named after it, in the task's natural units (:meth:`Task.predict`: class ids, metres,
unit normals, probabilities). Needs the ``onnx`` extra (onnx, onnxruntime, onnxscript).

The network (the architecture's exported form, :meth:`Architecture.exported`) is traced by ``torch.export``
with dynamic batch, height and width at an example size that is a multiple of no stride used here
(2 x 97 x 131), so every size-dependent branch of the model (padding, resampling) takes its general path;
then ``torch.onnx`` writes it at opset :data:`OPSET`. Two safeguards against a graph that only holds at the
example size: functions whose ONNX decomposition is fixed to the traced size are replaced during tracing
by exact size-generic equivalents (:data:`SIZE_GENERIC`: adaptive average pooling as two matrix products),
and the graph is run by onnxruntime at two other sizes (:data:`PROBES`, one a multiple of 32) and compared
with PyTorch before it is written; the differences go to the file's metadata.

A model that cannot be traced (control flow on tensor values, an operator with no ONNX form) is a
:class:`UserError` naming the operator or the model's line.
"""

from __future__ import annotations

import importlib.util
import json
import linecache
import re
import sysconfig
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from densemtl.atomic import atomic_write
from densemtl.engine.checkpoint import LoadedModel
from densemtl.errors import UserError
from densemtl.registry import ARCHITECTURES
from densemtl.tasks import Task

OPSET = 18
EXAMPLE = (2, 97, 131)  # (N, H, W) traced
PROBES = ((1, 64, 96), (2, 45, 77))  # (N, H, W) checked with onnxruntime after export
TOLERANCE = 1e-4  # largest difference to PyTorch allowed, relative to the output's scale when above 1
REQUIRED = ("onnx", "onnxruntime", "onnxscript")
PACKAGE_DIR = Path(__file__).resolve().parents[1]  # densemtl/
LIBRARY_DIRS = tuple(Path(sysconfig.get_paths()[key]).resolve() for key in ("stdlib", "purelib", "platlib"))


class TaskOutputs(nn.Module):
    """``image -> (prediction of each task, in task order)``: the function the ONNX graph holds."""

    def __init__(self, network: nn.Module, tasks: dict[str, Task]) -> None:
        super().__init__()
        self.network = network
        self.tasks = dict(tasks)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        raw = self.network(image)["pred"]
        return tuple(task.predict(raw[name]) for name, task in self.tasks.items())


def _pooling_matrix(size: Any, cells: Any, like: torch.Tensor) -> torch.Tensor:
    """``cells x size``: row ``i`` averages input positions ``floor(i size / cells) .. ceil((i + 1) size / cells) - 1``,
    the windows of adaptive average pooling, built from size-generic operations only."""
    index = torch.arange(cells, device=like.device)
    start = torch.div(index * size, cells, rounding_mode="floor")
    end = torch.div((index + 1) * size + cells - 1, cells, rounding_mode="floor")
    position = torch.arange(size, device=like.device)
    inside = (position[None] >= start[:, None]) & (position[None] < end[:, None])
    return inside.to(like.dtype) / (end - start)[:, None].to(like.dtype)


def adaptive_avg_pool2d(x: torch.Tensor, output_size: Any) -> torch.Tensor:
    """``F.adaptive_avg_pool2d`` as ``P_h x P_w^T``: the same windows for any traced input size."""
    cells = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
    rows = x.shape[-2] if cells[0] is None else cells[0]
    cols = x.shape[-1] if cells[1] is None else cells[1]
    return _pooling_matrix(x.shape[-2], rows, x) @ x @ _pooling_matrix(x.shape[-1], cols, x).transpose(0, 1)


SIZE_GENERIC = {F.adaptive_avg_pool2d: adaptive_avg_pool2d}


class _SizeGeneric(TorchFunctionMode):
    """Calls of the functions in :data:`SIZE_GENERIC` go to their size-generic equivalents while tracing."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        return SIZE_GENERIC.get(func, func)(*args, **(kwargs or {}))


def _require_onnx() -> tuple[Any, Any]:
    missing = [name for name in REQUIRED if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(f"ONNX export needs {', '.join(missing)}: pip install 'densemtl[onnx]'")
    import onnx
    import onnxruntime

    return onnx, onnxruntime


def _is_model_code(path: Path) -> bool:
    """Whether a traceback file holds model code: densemtl's own (but not this module) or anything outside the
    Python library folders (a model defined by the user)."""
    if path == Path(__file__).resolve():
        return False
    return path.is_relative_to(PACKAGE_DIR) or not any(path.is_relative_to(folder) for folder in LIBRARY_DIRS)


def _model_frame(err: BaseException) -> str | None:
    """The innermost line of model code the error (or an error it was raised from) passed through, with the
    function (``Module.forward`` for a module's) that holds it."""
    found = None
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        for frame, line in traceback.walk_tb(err.__traceback__):
            code = frame.f_code
            path = Path(code.co_filename).resolve()
            if _is_model_code(path):
                text = linecache.getline(code.co_filename, line).strip()
                found = f"{path.name}:{line} in {getattr(code, 'co_qualname', code.co_name)} (`{text}`)"
        err = err.__cause__ or err.__context__
    return found


def _module_of(program: Any, operator: str) -> str | None:
    """The model's submodule (path and class) that calls ``operator`` in a traced program."""
    short = operator.split(".")[-1]
    nodes = program.graph.nodes if program is not None else ()
    for node in nodes:
        if short in str(node.target):
            stack = node.meta.get("nn_module_stack") or {}
            if stack:
                path, kind = list(stack.values())[-1]
                return f"{path} ({getattr(kind, '__name__', str(kind).rsplit('.', 1)[-1])})"
    return None


_OPERATOR = re.compile(r"OpOverload\(op='([\w.]+)'|torch\.ops\.(\w+\.\w+)|aten::(\w+)")
_SUMMARY = "## Exception summary"


def _reason(message: str) -> str:
    """The informative line of an exporter's message (torch.onnx puts it under its exception summary)."""
    lines = [line.strip() for line in message.split(_SUMMARY, 1)[-1].splitlines() if line.strip()]
    line = lines[0] if lines else "unknown error"
    return re.sub(r"^<class '[\w.]+'>: ", "", line)


def _culprit(err: BaseException, program: Any = None) -> str:
    """Where an export failed, then why: the model's line when tracing failed (``program`` None), else the
    operator with no ONNX form and the module calling it."""
    message = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).strip() or type(err).__name__
    operator = _OPERATOR.search(message)
    where = _model_frame(err) if program is None else None
    if where is None and operator:
        name = next(group for group in operator.groups() if group)
        module = _module_of(program, name)
        where = f"operator {name}" + (f" in module {module}" if module else "")
    return f"{where or 'the traced model'}: {_reason(message)}"


def trace(graph: TaskOutputs, arch: str) -> Any:
    """The ONNX program of ``graph`` with dynamic N, H and W; a clear error when it cannot be traced."""
    example = torch.randn(*EXAMPLE[:1], 3, *EXAMPLE[1:])
    dynamic = {0: torch.export.Dim.DYNAMIC, 2: torch.export.Dim.DYNAMIC, 3: torch.export.Dim.DYNAMIC}
    program = None
    try:
        with torch.no_grad(), _SizeGeneric():
            program = torch.export.export(graph, (example,), dynamic_shapes=(dynamic,), strict=False)
        return torch.onnx.export(
            program, (example,), dynamo=True, input_names=["image"], output_names=list(graph.tasks),
            opset_version=OPSET, verbose=False,
        )
    except Exception as err:  # torch.export and torch.onnx raise many kinds; each becomes one line here
        raise UserError(f"cannot export model.arch '{arch}' to ONNX: {_culprit(err, program)}") from None


def deviation(task: Task, raw: torch.Tensor, output: np.ndarray) -> float:
    """How far an ONNX output is from PyTorch's: the largest absolute difference for real-valued predictions; for
    integer ones (class ids, an argmax of ``raw``) the largest logit margin among pixels whose id differs."""
    expected = task.predict(raw.float())
    got = torch.from_numpy(np.asarray(output))
    if expected.is_floating_point():
        return float((expected - got).abs().max())
    top2 = raw.float().topk(2, dim=1).values
    margin = (top2[:, 0] - top2[:, 1]).reshape(expected.shape)
    differs = expected != got
    return float(margin[differs].max()) if differs.any() else 0.0


def verify(model_bytes: bytes, graph: TaskOutputs, runtime: Any) -> dict[str, dict[str, float]]:
    """Run the graph with onnxruntime at :data:`PROBES` and compare with PyTorch; fails beyond :data:`TOLERANCE`."""
    session = runtime.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(0)
    report: dict[str, dict[str, float]] = {}
    for batch, height, width in PROBES:
        image = torch.randn(batch, 3, height, width, generator=generator)
        with torch.no_grad():
            raw = graph.network(image)["pred"]
        outputs = session.run(None, {"image": image.numpy()})
        key = f"{batch}x{height}x{width}"
        report[key] = {}
        for (name, task), output in zip(graph.tasks.items(), outputs, strict=True):
            report[key][name] = difference = deviation(task, raw[name], output)
            scale = max(1.0, float(task.predict(raw[name].float()).abs().max()))
            if not difference <= TOLERANCE * scale:
                raise UserError(f"the ONNX graph differs from PyTorch on {name} at N x H x W = {key}: "
                                f"{difference:.3g} > {TOLERANCE * scale:.3g}; nothing written")
    return report


def export_onnx(loaded: LoadedModel, path: Path, description: dict[str, Any]) -> dict[str, Any]:
    """Write ``loaded``'s ONNX graph to ``path`` (metadata: opset, tasks.json, parity); returns the metadata."""
    onnx, runtime = _require_onnx()
    config = loaded.config
    network = ARCHITECTURES.lookup(config.model.arch).exported(loaded.model, config)
    graph = TaskOutputs(network.eval(), loaded.tasks).eval()
    proto = trace(graph, config.model.arch).model_proto
    parity = verify(proto.SerializeToString(), graph, runtime)
    metadata = {
        "opset": str(OPSET),
        "architecture": config.model.arch,
        "exported_form": (type(network).__doc__ or type(network).__name__).strip().splitlines()[0],
        "tasks": json.dumps(description),
        "parity_max_abs": json.dumps(parity),
    }
    onnx.helper.set_model_props(proto, metadata)
    proto.doc_string = f"densemtl {config.model.arch} model: image -> {', '.join(loaded.tasks)}"
    with atomic_write(path) as stream:
        stream.write(proto.SerializeToString())
    return metadata
