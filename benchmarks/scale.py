"""Paper-scale training cost: images/s, seconds per step, data waiting and peak memory, per config, with and
without activation checkpointing (``model.gradient_checkpointing``).

For each config of :data:`CASES` (the NYUD-v2 and PASCAL-Context multi-task configs, ViT-L at 448x576 and
512x512; the paper-scale computation-sharing configs, ViT-B at 416x416 and 512x512, batch 50 and 4; and the
synthetic method configs as they ship), ``--steps`` engine training steps (:meth:`Trainer.train_step`:
data, forward, losses, backward, clipping, AdamW) of the architecture's first phase, after ``--warmup`` steps,
on generated data at the config's resolution: every sample decodes a JPEG of the dataset's native image size,
draws random targets for its tasks and goes through the config's own augmentation (scale, crop, flip), loaded
by the config's ``data.num_workers`` workers. Figures: images/s, s/step, the share of the step spent waiting
for the data loader, and the peak memory of the measured steps (``torch.cuda.max_memory_allocated`` on a GPU,
the peak resident set size of the process on a CPU; model, gradients and optimiser state included).

On a GPU every config runs as it is (batch, resolution, ``train.amp``). On a CPU the paper-scale configs run at
reduced size (``--cpu-scale`` of the side, batch 1, no autocast) and the JSON and table say so. Usage::

    python benchmarks/scale.py --out runs/bench/scale.json                          # GPU: about 5 minutes
    OMP_NUM_THREADS=2 python benchmarks/scale.py --steps 2 --warmup 1 --out runs/bench/scale_cpu.json
"""

from __future__ import annotations

import argparse
import io
import json
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from densemtl.config import Config, load_config
from densemtl.data.transforms import build_transform
from densemtl.engine.distributed import DistInfo, synchronize
from densemtl.engine.objective import build_objective
from densemtl.engine.phased import phase_config
from densemtl.engine.trainer import Trainer
from densemtl.jsonio import write_json
from densemtl.registry import ARCHITECTURES, DATASETS
from densemtl.tasks import ClassMapTask, ProbabilityMapTask, Task, build_tasks

ROOT = Path(__file__).resolve().parents[1]
CASES = ["nyud_multitask", "pascal_multitask", "nyud_sharing", "pascal_sharing", "synthetic_mtcp",
         "synthetic_sharing", "synthetic_contrastive"]
PAPER_SCALE = {"nyud_multitask", "pascal_multitask", "nyud_sharing", "pascal_sharing"}  # reduced on a CPU


def random_target(task: Task, size: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """A valid target of ``task`` at ``size``: labels, sparse binary maps, or positive values."""
    if isinstance(task, ClassMapTask):
        return torch.randint(task.num_classes, size, generator=generator)
    if isinstance(task, ProbabilityMapTask):
        return (torch.rand(1, *size, generator=generator) > 0.9).float()
    return torch.rand(task.target_channels, *size, generator=generator) + 0.5


class GeneratedScenes(Dataset):
    """Samples as a folder dataset gives them, without files: a decoded JPEG of the native size, random targets
    for every task, the config's training augmentation."""

    def __init__(self, config: Config, tasks: dict[str, Task], size: tuple[int, int], length: int) -> None:
        self.tasks, self.size, self.length = tasks, size, length
        self.info = DATASETS.lookup(config.data.dataset).dataset_info(config.data.tasks)
        self.transform = build_transform(config.data, {name: task.fill_value for name, task in tasks.items()})
        smooth = np.random.default_rng(0).integers(0, 255, (size[0] // 8 + 1, size[1] // 8 + 1, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(smooth).resize((size[1], size[0]), Image.BILINEAR).save(buffer, format="JPEG", quality=90)
        self.jpeg = buffer.getvalue()

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Any]:
        generator = torch.Generator().manual_seed(index)
        sample: dict[str, Any] = {"image": np.asarray(Image.open(io.BytesIO(self.jpeg)).convert("RGB"))}
        sample.update({name: random_target(task, self.size, generator) for name, task in self.tasks.items()})
        sample["meta"] = {"name": f"generated_{index:06d}", "size": self.size}
        return self.transform(sample, index)


def reduced(config_path: Path, device: torch.device, cpu_scale: float) -> list[str]:
    """Overrides that shrink a paper-scale config for a CPU (none on a GPU)."""
    if device.type == "cuda" or config_path.stem not in PAPER_SCALE:
        return []
    crop = load_config(config_path).data.crop_size
    side = [max(32, int(round(s * cpu_scale / 32)) * 32) for s in crop]
    return [f"data.crop_size=[{side[0]},{side[1]}]", "data.batch_size=1", "train.amp=none"]


class PeakMemory:
    """Peak memory from :meth:`reset` on: CUDA max allocated bytes, or the process's peak resident set size."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")  # Linux: restart the peak RSS (VmHWM) from the current
        except OSError:
            pass  # elsewhere the peak since the process started

    def gib(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**30
        try:
            status = Path("/proc/self/status").read_text()
            return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 2**20
        except (OSError, AttributeError):
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def measure(config: Config, device: torch.device, steps: int, warmup: int, scratch: Path) -> dict[str, Any]:
    """Train the first phase of ``config``'s architecture (set up as :mod:`densemtl.engine.phased` does) for
    ``warmup + steps`` steps; the figures of the last ``steps``."""
    torch.manual_seed(0)
    dataset = DATASETS.lookup(config.data.dataset)
    size = tuple(config.data.crop_size or dataset.native_size(config.data))
    native = dataset.native_size(config.data)
    info = dataset.dataset_info(config.data.tasks)
    tasks = build_tasks(config.data.tasks, info, config.loss.normals_loss)
    architecture = ARCHITECTURES.lookup(config.model.arch)
    model = architecture.build(config, info, tasks)
    phase = architecture.phases(config, model)[0]
    phase.enter(model)
    phase_tasks = {name: tasks[name] for name in phase.tasks}
    length = (steps + warmup + 1) * config.data.batch_size * config.train.accumulate
    train_set = GeneratedScenes(config, tasks, tuple(native), length)
    objective = build_objective(phase_config(config, phase), phase_tasks, model.feature_channels)
    memory = PeakMemory(device)
    trainer = Trainer(config, model, objective, train_set, scratch, info=info, parameters=phase.parameters(model),
                      steps=steps + warmup, dist_info=DistInfo(), device=device, loss_hook=phase.loss_hook,
                      clip_groups=phase.clip_groups(model) if phase.clip_groups else None)
    for _ in range(warmup):
        trainer.train_step()
    synchronize(device)
    memory.reset()
    trainer.data_wait = 0.0
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    synchronize(device)
    elapsed = time.perf_counter() - start
    images = steps * config.data.batch_size * config.train.accumulate
    return {
        "phase": phase.name,
        "tasks": list(phase.tasks),
        "resolution": list(size),
        "batch_size": config.data.batch_size,
        "num_workers": config.data.num_workers,
        "amp": config.train.amp,
        "parameters_M": sum(p.numel() for p in model.parameters()) / 1e6,
        "images_per_s": images / elapsed,
        "s_per_step": elapsed / steps,
        "data_wait_share": trainer.data_wait / elapsed,
        "peak_memory_GiB": memory.gib(),
    }


def markdown(figures: dict[str, Any]) -> str:
    """The results as a Markdown table."""
    memory = "peak CUDA allocated GiB" if figures["device"].startswith("cuda") else "peak RSS GiB"
    lines = [f"| config | checkpointing | resolution | batch | amp | img/s | s/step | data wait | {memory} |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, case in figures["cases"].items():
        for mode, row in case["runs"].items():
            size = "x".join(map(str, row["resolution"])) + (" (reduced)" if case["reduced"] else "")
            lines.append(f"| {name} | {mode} | {size} | {row['batch_size']} | {row['amp']} | {row['images_per_s']:.2f} "
                         f"| {row['s_per_step']:.3f} | {row['data_wait_share']:.1%} | {row['peak_memory_GiB']:.2f} |")
    return "\n".join(lines) + "\n"


def run_one(case: str, mode: str, args: argparse.Namespace) -> dict[str, Any]:
    """One measurement in a fresh process, so the peak memory of one run does not carry into the next."""
    command = [sys.executable, __file__, "--one", f"{case}:{mode}", "--steps", str(args.steps), "--warmup",
               str(args.warmup), "--device", args.device, "--cpu-scale", str(args.cpu_scale)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{case} (checkpointing {mode}) failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_one(case: str, mode: str, args: argparse.Namespace) -> dict[str, Any]:
    """``case`` (a file of configs/) with checkpointing ``mode`` (on/off), reduced on a CPU."""
    device = torch.device(args.device)
    path = ROOT / "configs" / f"{case}.yaml"
    shrink = reduced(path, device, args.cpu_scale)
    config = load_config(path, [*shrink, f"train.device={device}", f"model.gradient_checkpointing={mode == 'on'}"])
    with tempfile.TemporaryDirectory() as scratch:
        row = measure(config, device, args.steps, args.warmup, Path(scratch))
    return {**row, "reduced_by": shrink}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=CASES, help="names of files in configs/")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--cpu-scale", type=float, default=0.25, help="side factor of paper-scale configs on a CPU")
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench" / "scale.json"))
    parser.add_argument("--one", help=argparse.SUPPRESS)  # CASE:MODE, in the process run_one starts
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure_one(*args.one.split(":"), args)))
        return
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    figures: dict[str, Any] = {"device": str(device), "device_name": name, "steps": args.steps, "warmup": args.warmup,
                               "torch": torch.__version__, "cases": {}}
    total = time.perf_counter()
    for case in args.configs:
        runs = {mode: run_one(case, mode, args) for mode in ("off", "on")}
        figures["cases"][case] = {"reduced": bool(runs["off"]["reduced_by"]), "runs": runs}
        for mode, row in runs.items():
            print(f"{case:<22} checkpointing {mode:<3} {'x'.join(map(str, row['resolution']))} "
                  f"batch {row['batch_size']}: {row['images_per_s']:.2f} img/s, {row['s_per_step']:.3f} s/step, "
                  f"data wait {row['data_wait_share']:.1%}, peak {row['peak_memory_GiB']:.2f} GiB", flush=True)
    figures["seconds"] = time.perf_counter() - total
    out = write_json(figures, args.out)
    table = Path(out).with_suffix(".md")
    table.write_text(f"{name}, {args.steps} steps after {args.warmup} warm-up\n\n" + markdown(figures))
    print(markdown(figures))
    print(f"wrote {out} and {table} in {figures['seconds']:.0f} s")


if __name__ == "__main__":
    main()
