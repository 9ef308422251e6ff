"""Training throughput, the share of a step spent waiting for data, and inference latency.

For the demo configuration (configs/synthetic.yaml: the default CPU model) and the same with a
ViT-S-sized backbone. A training step is the engine's own (:meth:`Trainer.train_step`: data, forward,
losses, backward, clipping, AdamW); the data wait is the time inside the data loader's ``next``.
Latency: one image at the native size, ``eval`` mode, no gradients, median over repeats. Usage::

    OMP_NUM_THREADS=2 python benchmarks/train_speed.py --out runs/bench/train_speed.json [--steps 10]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from densemtl.config import load_config
from densemtl.data import build_dataset
from densemtl.engine.distributed import DistInfo
from densemtl.engine.objective import build_objective
from densemtl.engine.trainer import Trainer
from densemtl.jsonio import write_json
from densemtl.models import build_model
from densemtl.tasks import build_tasks

ROOT = Path(__file__).resolve().parents[1]
CASES = {"default_cpu": [], "vit_s": ["model.backbone=vit-s"]}


def measure(config_path: Path, overrides: list[str], steps: int, repeats: int, scratch: Path) -> dict[str, float]:
    """Images/s and data-wait share over ``steps`` training steps (after 2 warm-up steps), and latency."""
    config = load_config(config_path, overrides + [
        "data.synthetic.num_train=64", "data.synthetic.num_val=4", "train.device=cpu",
        f"data.synthetic.cache_dir={scratch / 'cache'}", f"out_dir={scratch / 'run'}",
    ])
    torch.manual_seed(0)
    train_set = build_dataset(config.data, "train", train=True)
    tasks = build_tasks(config.data.tasks, train_set.info, config.loss.normals_loss)
    model = build_model(config, train_set.info, tasks)
    objective = build_objective(config, tasks, model.feature_channels)
    trainer = Trainer(config, model, objective, train_set, scratch / "run", info=train_set.info,
                      dist_info=DistInfo(), device=torch.device("cpu"))
    for _ in range(2):
        trainer.train_step()
    trainer.data_wait = 0.0
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(steps):
        trainer.train_step()
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    images = steps * config.data.batch_size * config.train.accumulate

    model.eval()
    image = train_set[0]["image"][None]
    times = []
    with torch.no_grad():
        model(image)
        for _ in range(repeats):
            begin = time.perf_counter()
            model(image)
            times.append((time.perf_counter() - begin) * 1000)
    return {
        "parameters_M": sum(p.numel() for p in model.parameters()) / 1e6,
        "image_size": list(image.shape[-2:]),
        "batch_size": config.data.batch_size,
        "train_images_per_s": images / elapsed,
        "train_step_ms": elapsed / steps * 1000,
        "train_step_cpu_ms": cpu / steps * 1000,  # CPU time of all threads: less sensitive to other load
        "data_wait_share": trainer.data_wait / elapsed,
        "latency_ms": statistics.median(times),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "synthetic.yaml"))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench" / "train_speed.json"))
    args = parser.parse_args()
    figures = {"torch_threads": torch.get_num_threads(), "device": "cpu", "config": args.config, "cases": {}}
    with tempfile.TemporaryDirectory() as scratch:
        for name, overrides in CASES.items():
            result = measure(Path(args.config), overrides, args.steps, args.repeats, Path(scratch))
            figures["cases"][name] = result
            print(f"{name:<12} {result['parameters_M']:6.2f}M params  train {result['train_images_per_s']:7.1f} img/s "
                  f"({result['train_step_ms']:.0f} ms/step, data wait {result['data_wait_share']:.1%})  "
                  f"latency {result['latency_ms']:.1f} ms at {result['image_size'][0]}x{result['image_size'][1]}")
    print(f"wrote {write_json(figures, args.out)}")


if __name__ == "__main__":
    main()
