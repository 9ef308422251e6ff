"""Latency per image of PyTorch eager vs onnxruntime on the CPU, for the demo model and a ViT-S model.

Both models are the multi-task network of ``configs/synthetic.yaml`` (five tasks), with its ``resnet-tiny``
backbone (the demo) or ``vit-s``, random weights (latency does not depend on them). Each is exported once
with :func:`densemtl.engine.onnx_export.export_onnx` (which checks the graph against PyTorch), then both
runtimes predict one image at 96x128 and at 480x640 on the same number of threads, alternating image by
image so that a busy machine slows both alike; the figure is the median over ``--repeats`` images, and
the ratio is PyTorch's time over onnxruntime's. Usage::

    OMP_NUM_THREADS=1 python benchmarks/export.py --out runs/bench/export.json [--repeats 20] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import onnxruntime
import torch

from densemtl.config import load_config
from densemtl.data.synthetic import synthetic_info
from densemtl.engine.checkpoint import LoadedModel
from densemtl.engine.model_folder import describe_tasks
from densemtl.engine.onnx_export import TaskOutputs, export_onnx
from densemtl.jsonio import write_json
from densemtl.models import build_model
from densemtl.registry import ARCHITECTURES
from densemtl.tasks import build_tasks

MODELS = {"demo": [], "vit-s": ["model.backbone=vit-s"]}
SIZES = ((96, 128), (480, 640))


def build(overrides: list[str]) -> LoadedModel:
    torch.manual_seed(0)
    config = load_config("configs/synthetic.yaml", overrides)
    info = synthetic_info()
    tasks = build_tasks(config.data.tasks, info)
    return LoadedModel(build_model(config, info, tasks).eval(), tasks, config, info, 0)


def latencies(graph: TaskOutputs, session: onnxruntime.InferenceSession, size: tuple[int, int], repeats: int
              ) -> tuple[list[float], list[float]]:
    """Seconds per image of each runtime, measured alternately after one warm-up image each."""
    image = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(0))
    feed = {"image": image.numpy()}
    eager, runtime = [], []
    with torch.inference_mode():
        for index in range(repeats + 1):
            start = time.perf_counter()
            graph(image)
            middle = time.perf_counter()
            session.run(None, feed)
            end = time.perf_counter()
            if index:
                eager.append(middle - start)
                runtime.append(end - middle)
    return eager, runtime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/bench/export.json")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="for both runtimes")
    args = parser.parse_args()
    if args.repeats < 1 or args.threads < 1:
        parser.error("--repeats and --threads must be >= 1")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    report = {"threads": args.threads, "repeats": args.repeats, "torch": torch.__version__,
              "onnxruntime": onnxruntime.__version__, "models": {}}
    for name, overrides in MODELS.items():
        loaded = build(overrides)
        path = out.with_name(f"{out.stem}-{name}.onnx")
        start = time.perf_counter()
        export_onnx(loaded, path, describe_tasks(loaded.config, loaded.info, loaded.tasks))
        export_seconds = time.perf_counter() - start
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = args.threads
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        network = ARCHITECTURES[loaded.config.model.arch].exported(loaded.model, loaded.config)
        graph = TaskOutputs(network, loaded.tasks).eval()
        figures = {"export_seconds": export_seconds,
                   "parameters_m": sum(p.numel() for p in loaded.model.parameters()) / 1e6}
        for size in SIZES:
            eager, runtime = latencies(graph, session, size, args.repeats)
            eager_ms, runtime_ms = statistics.median(eager) * 1e3, statistics.median(runtime) * 1e3
            figures[f"{size[0]}x{size[1]}"] = {"pytorch_ms": eager_ms, "onnxruntime_ms": runtime_ms,
                                               "ratio": eager_ms / runtime_ms}
            print(f"{name} {size[0]}x{size[1]}: PyTorch {eager_ms:.1f} ms, onnxruntime {runtime_ms:.1f} ms, "
                  f"ratio {eager_ms / runtime_ms:.2f}", flush=True)
        report["models"][name] = figures
    print(f"wrote {write_json(report, out)}")


if __name__ == "__main__":
    main()
