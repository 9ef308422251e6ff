"""MT-CP: cost of the cross-task fusion attention, and (with ``--compare``) the synthetic comparison.

Default (cheap, what ``make bench`` runs): forward latency of the MT-CP model and the size of the CFM
attention score matrix for full attention and for the bounded variants, at the given input sizes.

    python benchmarks/mtcp.py --out runs/bench/mtcp.json [--sizes 96x128 240x320] [--attention none 16 8]

``--compare`` trains, one run at a time, the single-task baselines, the shared-encoder baseline and
MT-CP with each balancer on the synthetic data (same steps, batch and seeds), then prints per-task
metrics and delta_m against the single-task runs of the same seed, and parameters and GFLOPs from
:func:`densemtl.engine.bench.run_bench`. Runs whose ``results.json`` exists are reused, so an
interrupted comparison continues where it stopped.

    python benchmarks/mtcp.py --compare --seeds 0 1 2 --steps 400 --out runs/mtcp_compare/summary.json

``--plot PNG`` (with ``--compare``; needs ``pip install densemtl[plots]``) draws delta_m per variant and seed,
and the LPS weights over training of the first seed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from densemtl.config import load_config
from densemtl.jsonio import write_json
from densemtl.tasks import TASKS

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "synthetic_mtcp.yaml"

# label -> overrides on configs/synthetic_mtcp.yaml; "single" provides the delta_m reference
VARIANTS: dict[str, list[str]] = {
    "single": ["model.arch=single", "loss.balancer=fixed"],
    "shared_encoder": ["model.arch=multitask", "loss.balancer=fixed"],
    "mtcp_fixed": ["loss.balancer=fixed"],
    "mtcp_lps": ["loss.balancer=lps", "loss.balancer_args.window=25"],
    "mtcp_uncertainty": ["loss.balancer=uncertainty"],
    "mtcp_dwa": ["loss.balancer=dwa", "loss.balancer_args.window=25"],
    "mtcp_gradnorm": ["loss.balancer=gradnorm"],
    # ablations of LPS: the log projection with constant weights (spread 0), and NYUD's spread
    "mtcp_log_projection": ["loss.balancer=lps", "loss.balancer_args.window=25", "loss.balancer_args.spread=0"],
    "mtcp_lps_spread7.5": ["loss.balancer=lps", "loss.balancer_args.window=25", "loss.balancer_args.spread=7.5"],
}


def _parse_size(text: str) -> tuple[int, int]:
    height, width = text.lower().split("x")
    return int(height), int(width)


def attention_cost(sizes: list[str], attention: list[str], repeats: int) -> list[dict[str, Any]]:
    """Latency of one MT-CP forward (batch 1) and the CFM score-matrix size per attention setting."""
    from densemtl.engine.bench import dataset_info
    from densemtl.models import build_model
    from densemtl.tasks import build_tasks

    rows = []
    for size in sizes:
        height, width = _parse_size(size)
        for setting in attention:
            limit = None if setting == "none" else int(setting)
            config = load_config(CONFIG, [f"mtcp.attention_size={'null' if limit is None else limit}"])
            info = dataset_info(config)
            model = build_model(config, info, build_tasks(list(config.data.tasks), info)).eval()
            image = torch.randn(1, 3, height, width)
            fusion = next(iter(model.fusion.values()))
            queries = -(-height // 32) * 8 * (-(-width // 32) * 8)  # the 1/4 map of the padded image
            grid = fusion.key_grid(-(-height // 32) * 8, -(-width // 32) * 8)
            keys = grid[0] * grid[1]
            times = []
            with torch.no_grad():
                model(image)
                for _ in tqdm(range(repeats), desc=f"{size} attention={setting}", leave=False):
                    start = time.perf_counter()
                    model(image)
                    times.append((time.perf_counter() - start) * 1000)
            rows.append(
                {
                    "size": [height, width],
                    "attention_size": limit,
                    "queries": queries,
                    "keys": keys,
                    "scores_per_task_mib": queries * keys * 4 / 2**20,
                    "latency_ms": statistics.median(times),
                }
            )
            print(
                f"{size:>9}  attention={setting:>4}  keys {keys:>6}  scores/task {rows[-1]['scores_per_task_mib']:8.2f}"
                f" MiB  latency {rows[-1]['latency_ms']:8.1f} ms"
            )
    return rows


def train_variant(label: str, seed: int, steps: int, root: Path, extra: list[str]) -> dict[str, dict[str, float]]:
    """Train one variant (or reuse its finished run) and return its final test results."""
    from densemtl.engine.run import run_training

    run_dir = root / f"seed{seed}" / label
    result_file = run_dir / "results.json"
    if result_file.exists():
        return json.loads(result_file.read_text())["results"]
    overrides = VARIANTS[label] + [
        f"train.seed={seed}",
        f"train.steps={steps}",
        f"train.eval_every={steps}",
        f"train.checkpoint_every={steps}",
        "data.val_split=test",  # the final results are reported; no checkpoint is selected on them
        f"out_dir={run_dir}",
        f"name={label}",
        *extra,
    ]
    print(f"== {label} seed {seed}: {' '.join(overrides)}", flush=True)
    run_training(load_config(CONFIG, overrides))
    return json.loads(result_file.read_text())["results"]


def compare(seeds: list[int], steps: int, root: Path, variants: list[str], extra: list[str]) -> dict[str, Any]:
    from densemtl.engine.bench import run_bench
    from densemtl.metrics.delta_m import delta_m

    runs: dict[str, dict[int, Any]] = {label: {} for label in variants}
    for seed in seeds:
        for label in ["single"] + [v for v in variants if v != "single"]:
            runs.setdefault(label, {})[seed] = train_variant(label, seed, steps, root, extra)
    summary: dict[str, Any] = {"seeds": seeds, "steps": steps, "extra_overrides": extra, "variants": {}}
    for label, by_seed in runs.items():
        tasks = list(next(iter(by_seed.values())))
        primary = {t: [by_seed[s][t][TASKS[t].primary_metric] for s in seeds] for t in tasks}
        eval_config = load_config(CONFIG, extra).eval
        deltas = [delta_m(by_seed[s], runs["single"][s], eval_config=eval_config) for s in seeds]
        config = load_config(CONFIG, VARIANTS[label] + extra)
        cost = run_bench(config, root / "bench" / f"{label}.json", repeats=3)
        summary["variants"][label] = {
            "overrides": VARIANTS[label],
            "primary": {t: {"metric": TASKS[t].primary_metric, "per_seed": v} for t, v in primary.items()},
            "delta_m_per_seed": deltas,
            "parameters_m": cost["parameters"]["total"] / 1e6,
            "gflops": cost["gflops"]["total"],
        }
    print(format_summary(summary))
    return summary


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4g}"
    return f"{statistics.mean(values):.4g} ± {statistics.stdev(values):.2g}"


def format_summary(summary: dict[str, Any]) -> str:
    """A markdown table: per-task primary metric, delta_m (mean ± std over seeds), params, GFLOPs."""
    variants = summary["variants"]
    tasks = list(next(iter(variants.values()))["primary"])
    header = ["variant"] + [f"{t} {variants[next(iter(variants))]['primary'][t]['metric']}" for t in tasks]
    header += ["delta_m %", "params M", "GFLOPs"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, row in variants.items():
        cells = [label] + [_mean_std(row["primary"][t]["per_seed"]) for t in tasks]
        cells += [_mean_std(row["delta_m_per_seed"]), f"{row['parameters_m']:.3f}", f"{row['gflops']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_comparison(summary: dict[str, Any], root: Path, path: Path) -> None:
    """delta_m of every variant (one dot per seed, a bar at the mean) and the LPS variants' weights."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise SystemExit("--plot needs matplotlib: pip install 'densemtl[plots]'") from err
    variants = {k: v for k, v in summary["variants"].items() if k != "single"}
    seed = summary["seeds"][0]
    weights: dict[str, list[dict[str, Any]]] = {}  # LPS variants whose weights move (not spread 0)
    for label in variants:
        if VARIANTS[label][0] == "loss.balancer=lps":
            lines = (root / f"seed{seed}" / label / "log.jsonl").read_text().splitlines()
            records = [r for r in map(json.loads, lines) if r["kind"] == "train"]
            if any(r[key] != 1.0 for r in records for key in r if key.startswith("weight/")):
                weights[label] = records
    fig, axes = plt.subplots(
        1, 1 + len(weights), figsize=(5 + 3.2 * len(weights), 3.8), gridspec_kw={"wspace": 0.35}, squeeze=False
    )
    axes = axes[0]
    left = axes[0]
    for x, row in enumerate(variants.values()):
        values = row["delta_m_per_seed"]
        left.bar(x, statistics.mean(values), color="#b8c7dc", width=0.7)
        left.scatter([x] * len(values), values, color="#1f3b63", s=14, zorder=3)
    left.axhline(0, color="black", linewidth=0.8)
    left.set_xticks(range(len(variants)), [label.replace("mtcp_", "") for label in variants], rotation=45,
                    ha="right", fontsize=8)
    left.set_ylabel("delta_m vs single-task networks (%)")
    left.set_title(f"{len(summary['seeds'])} seeds, {summary['steps']} steps", fontsize=9)
    for axis, (label, records) in zip(axes[1:], weights.items(), strict=True):
        for task in TASKS:
            if f"weight/{task}" in records[0]:
                axis.plot([r["step"] for r in records], [r[f"weight/{task}"] for r in records], label=task)
        axis.set_title(f"{label.replace('mtcp_', '')} weights (seed {seed})", fontsize=9)
        axis.set_xlabel("step")
    if weights:
        axes[1].legend(fontsize=7)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench/mtcp.json"))
    parser.add_argument("--sizes", nargs="+", default=["96x128", "240x320"])
    parser.add_argument("--attention", nargs="+", default=["none", "16", "8"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--compare", action="store_true", help="train and compare the variants (slow)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--set", nargs="*", default=[], help="extra overrides for every run")
    parser.add_argument("--plot", type=Path, help="with --compare: PNG of delta_m per variant and the LPS weights")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.compare:
        result = compare(args.seeds, args.steps, args.out.parent, args.variants, args.set)
        if args.plot:
            plot_comparison(result, args.out.parent, args.plot)
    else:
        result = {"attention": attention_cost(args.sizes, args.attention, args.repeats), "threads": args.threads}
    write_json(result, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
