"""Cost of each loss balancer per training step relative to ``fixed`` (time and memory), and the trained
comparison of the balancers on the synthetic scenes.

The gradient-manipulating schemes (pcgrad, cagrad, mgda, nashmtl) back-propagate every task's loss on its
own through the shared part, then the total once more: about T + 1 backward passes through the encoder
instead of one for T tasks (MGDA-UB's default, the gradients of the shared representation, stops those
passes at the representation and needs one pass through the encoder). Each balancer runs the real
``Trainer.train_step`` in a fresh process, so its peak resident memory (and, on a GPU, its peak allocated
memory) is its own. Besides wall-clock seconds per step it reports the process's CPU seconds per step, which
a machine shared with other jobs inflates less. Prints a table and writes JSON.

    python benchmarks/balancers.py --out runs/bench/balancers.json [--set data.batch_size=8] [--steps 10]

``--compare ROOT --references REFS`` summarises trained runs instead: ``ROOT/seed<s>/<balancer>/results.json``
against the single-task networks ``REFS/seed<s>/single/results.json`` of the same seed. Per balancer: each
task's primary metric and Delta-m (mean ± standard deviation over seeds), the paired difference of Delta-m
to ``fixed`` on the same seeds, and whether it is outside the seed noise (the same sign on every seed and a
mean larger than the standard deviation of the differences), and Delta-m per seed. Runs not finished yet
are listed as pending. Prints Markdown tables, writes JSON.

    python benchmarks/balancers.py --compare runs/bal20/compare --references runs/m16/compare \
        --out runs/bench/balancer_comparison.json
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from comparison import spread, verdict

# name -> extra overrides; mgda twice: its default (the representation) and on the shared parameters
VARIANTS = {
    "fixed": [],
    "gradnorm": ["loss.balancer=gradnorm"],
    "pcgrad": ["loss.balancer=pcgrad"],
    "cagrad": ["loss.balancer=cagrad"],
    "mgda": ["loss.balancer=mgda"],
    "mgda (parameters)": ["loss.balancer=mgda", "loss.balancer_args={gradients: parameters}"],
    "nashmtl": ["loss.balancer=nashmtl"],
}
BASE = ["model.arch=multitask", "loss.balancer=fixed", "train.device=auto"]


def measure(config_path: str, overrides: list[str], steps: int, threads: int) -> dict:
    """Median seconds per training step (after two warm-up steps) and peak memory, in this process."""
    from densemtl.config import load_config
    from densemtl.data import build_dataset
    from densemtl.engine.distributed import setup
    from densemtl.engine.objective import build_objective
    from densemtl.engine.trainer import Trainer
    from densemtl.models import build_model
    from densemtl.tasks import build_tasks

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    config = load_config(config_path, BASE + overrides + ["out_dir=/tmp/densemtl-bench-balancers"])
    dist_info, device = setup(config.train.device)
    train_set = build_dataset(config.data, config.data.train_split, train=True)
    tasks = build_tasks(config.data.tasks, train_set.info, config.loss.normals_loss)
    model = build_model(config, train_set.info, tasks)
    objective = build_objective(config, tasks, model.feature_channels)
    trainer = Trainer(config, model, objective, train_set, config.out_dir, info=train_set.info,
                      dist_info=dist_info, device=device)
    times, cpu_times = [], []
    for step in range(steps + 2):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start, cpu_start = time.perf_counter(), time.process_time()
        trainer.train_step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= 2:
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
    shared = trainer.task_gradients.shared if trainer.task_gradients is not None else []
    return {
        "seconds_per_step": statistics.median(times),
        "cpu_seconds_per_step": statistics.median(cpu_times),  # this process's CPU time: robust to a busy machine
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None,
        "tasks": len(tasks),
        "shared_parameters": sum(p.numel() for p in shared),
        "device": str(device),
    }


def noise_verdict(differences: list[float]) -> str:
    """``ahead``/``behind`` when every seed agrees in sign and the mean exceeds the differences' spread."""
    if len(differences) < 2:
        return "pending" if not differences else "one seed: not judged"
    return verdict(differences)


def compare(root: Path, references: Path, seeds: list[int], balancers: list[str]) -> dict:
    """The summary described in the module docstring (``fixed`` must be among ``balancers``). A run without
    its ``results.json`` yet is left out and listed as pending; paired differences use the seeds where both
    runs exist."""
    from densemtl.metrics.delta_m import delta_m, load_results
    from densemtl.registry import TASKS

    single = {s: load_results(references / f"seed{s}" / "single" / "results.json") for s in seeds}
    paths = {b: {s: root / f"seed{s}" / b / "results.json" for s in seeds} for b in balancers}
    runs = {b: {s: load_results(path) for s, path in by_seed.items() if path.exists()} for b, by_seed in paths.items()}
    pending = [str(path.parent) for b in balancers for s, path in paths[b].items() if s not in runs[b]]
    deltas = {b: {s: delta_m(results, single[s]) for s, results in runs[b].items()} for b in balancers}
    tasks = list(single[seeds[0]])
    rows = {}
    for name in balancers:
        paired = [s for s in deltas[name] if s in deltas["fixed"]]
        differences = [deltas[name][s] - deltas["fixed"][s] for s in paired]
        rows[name] = {
            "seeds": list(deltas[name]),
            "primary": {t: [runs[name][s][t][TASKS[t].primary_metric] for s in deltas[name]] for t in tasks},
            "delta_m": list(deltas[name].values()),
            "paired_seeds": paired,
            "minus_fixed": differences,
            "verdict": noise_verdict(differences) if name != "fixed" else "",
        }
    header = ["balancer", "seeds", *(f"{t} {TASKS[t].primary_metric}" for t in tasks), "Delta-m %",
              "minus fixed (per seed)", "verdict"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    reference = {t: [single[s][t][TASKS[t].primary_metric] for s in seeds] for t in tasks}
    lines.append(f"| single-task | {','.join(map(str, seeds))} | "
                 + " | ".join(spread(reference[t], 3 if t == "depth" else 2) for t in tasks) + " | 0 | | |")
    for name, row in rows.items():
        if not row["seeds"]:
            continue
        cells = [name, ",".join(map(str, row["seeds"])),
                 *(spread(row["primary"][t], 3 if t == "depth" else 2) for t in tasks), spread(row["delta_m"], 2)]
        paired = row["minus_fixed"]
        cells.append("" if name == "fixed" or not paired else
                     f"{statistics.mean(paired):+.2f} ({' / '.join(f'{d:+.2f}' for d in paired)})")
        cells.append(row["verdict"])
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| balancer | " + " | ".join(f"Delta-m seed {s}" for s in seeds) + " |",
              "|" + "---|" * (len(seeds) + 1)]
    for name in balancers:
        lines.append(f"| {name} | " + " | ".join(f"{deltas[name][s]:+.2f}" if s in deltas[name] else "pending"
                                                 for s in seeds) + " |")
    print("\n".join(lines))
    if pending:
        print("pending (no results.json yet): " + ", ".join(pending))
    return {"seeds": seeds, "root": str(root), "references": str(references), "single": reference, "rows": rows,
            "pending": pending}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/synthetic_mtcp.yaml")
    parser.add_argument("--set", nargs="*", default=[], help="dotted overrides for every variant")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", default=None, help=argparse.SUPPRESS)  # one variant, in a child process
    parser.add_argument("--compare", type=Path, default=None, help="summarise the trained runs under this folder")
    parser.add_argument("--references", type=Path, default=None, help="folder of the single-task runs")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--balancers", nargs="+", default=["fixed", "pcgrad", "cagrad", "mgda", "nashmtl"])
    parser.add_argument("--out", default="runs/bench/balancers.json")
    args = parser.parse_args()
    if args.compare is not None:
        from densemtl.jsonio import write_json

        summary = compare(args.compare, args.references or args.compare, args.seeds, args.balancers)
        print(f"wrote {write_json(summary, args.out)}")
        return
    if args.only is not None:
        print(json.dumps(measure(args.config, VARIANTS[args.only] + args.set, args.steps, args.threads)))
        return

    from densemtl.jsonio import write_json

    rows = {}
    for name in VARIANTS:
        command = [sys.executable, __file__, "--only", name, "--config", args.config, "--steps", str(args.steps),
                   "--threads", str(args.threads), "--set", *args.set]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        rows[name] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"measured {name}", file=sys.stderr)
    fixed = rows["fixed"]
    print(f"{rows['fixed']['tasks']} tasks, {rows['pcgrad']['shared_parameters'] / 1e6:.2f}M shared parameters, "
          f"{args.steps} steps each on {fixed['device']}")
    print(f"{'balancer':<20}{'s/step':>9}{'x fixed':>9}{'CPU s':>8}{'x fixed':>9}{'peak RSS MB':>13}{'x fixed':>9}"
          f"{'+MB':>7}{'CUDA MB':>9}")
    for name, row in rows.items():
        row["time_vs_fixed"] = row["seconds_per_step"] / fixed["seconds_per_step"]
        row["cpu_time_vs_fixed"] = row["cpu_seconds_per_step"] / fixed["cpu_seconds_per_step"]
        row["memory_vs_fixed"] = row["peak_rss_mb"] / fixed["peak_rss_mb"]
        row["memory_over_fixed_mb"] = row["peak_rss_mb"] - fixed["peak_rss_mb"]
        cuda = f"{row['peak_cuda_mb']:.0f}" if row["peak_cuda_mb"] is not None else "-"
        print(f"{name:<20}{row['seconds_per_step']:>9.3f}{row['time_vs_fixed']:>9.2f}{row['cpu_seconds_per_step']:>8.3f}"
              f"{row['cpu_time_vs_fixed']:>9.2f}{row['peak_rss_mb']:>13.0f}{row['memory_vs_fixed']:>9.2f}"
              f"{row['memory_over_fixed_mb']:>7.0f}{cuda:>9}")
    summary = {"config": args.config, "overrides": args.set, "steps": args.steps, "rows": rows}
    print(f"wrote {write_json(summary, args.out)}")


if __name__ == "__main__":
    main()
