"""MT-CP: cost of the cross-task fusion attention, and the synthetic comparison of its variants.

Default (cheap, what ``make bench`` runs): forward latency of the MT-CP model and the size of the CFM
attention score matrix for full attention and for pooled keys, at the given input sizes.

    python benchmarks/mtcp.py --out runs/bench/mtcp.json [--sizes 96x128 240x320] [--attention none 16 8]

The comparison (``--commands`` / ``--compare``, see ``benchmarks/comparison.py``) trains the references,
MT-CP with each balancer, the LPS ablations and densemtl's earlier layouts on configs/synthetic_mtcp.yaml:

    python benchmarks/mtcp.py --compare --seeds 0 1 2 --steps 300 --root runs/compare \
        --out runs/compare/mtcp.json --plot docs/images/mtcp_compare.png

``--plot PNG`` (needs ``pip install densemtl[plots]``) draws Delta-m per variant and seed, and the LPS
weights over training of the first seed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from comparison import MTCP_CONFIG, REFERENCES, Variant, add_arguments, run_family
from tqdm import tqdm

from densemtl.config import load_config
from densemtl.jsonio import write_json
from densemtl.tasks import TASKS

LPS = ["loss.balancer=lps", "loss.balancer_args.window=25"]  # 12 windows in 300 steps instead of 3 epochs


def _mtcp(overrides: list[str], baseline: str, note: str) -> Variant:
    return Variant(MTCP_CONFIG, overrides, baseline, note)


# label -> MT-CP variant on configs/synthetic_mtcp.yaml (official CFM, trace-back and deep supervision)
VARIANTS: dict[str, Variant] = {
    **REFERENCES,
    "mtcp_fixed": _mtcp(["loss.balancer=fixed"], "shared_encoder", "MT-CP, the fixed task weights"),
    "mtcp_lps": _mtcp(LPS, "mtcp_fixed", "LPS: spread 1.6, log projection, floor 0.01"),
    "mtcp_uncertainty": _mtcp(["loss.balancer=uncertainty"], "mtcp_fixed", ""),
    "mtcp_dwa": _mtcp(["loss.balancer=dwa", "loss.balancer_args.window=25"], "mtcp_fixed", ""),
    "mtcp_gradnorm": _mtcp(["loss.balancer=gradnorm"], "mtcp_fixed", "alpha 1.5, the backbone's parameters"),
    "mtcp_log_projection": _mtcp(["loss.balancer=lps", "loss.balancer_args.window=100000"], "mtcp_fixed",
                                 "LPS's log projection with the weights never updated (window > run)"),
    "mtcp_lps_no_projection": _mtcp([*LPS, "loss.balancer_args.projection=none"], "mtcp_fixed",
                                    "LPS on the raw losses, as the released code computes its statistic"),
    "mtcp_lps_spread7.5": _mtcp([*LPS, "loss.balancer_args.spread=7.5"], "mtcp_fixed", "NYUD's spread, floor 0.01"),
    "mtcp_lps_spread7.5_no_floor": _mtcp([*LPS, "loss.balancer_args.spread=7.5", "loss.balancer_args.floor=none"],
                                         "mtcp_lps_spread7.5", "the same without the floor: weights may go below 0"),
    "mtcp_cfm_bounded": _mtcp(["loss.balancer=fixed", "mtcp.cfm=bounded", "mtcp.attention_size=8"], "mtcp_fixed",
                              "densemtl's earlier CFM, keys pooled to 8 x 8"),
    "mtcp_earlier_layout": _mtcp(
        ["loss.balancer=fixed", "mtcp.cfm=bounded", "mtcp.attention_size=8", "mtcp.traceback=residual",
         "mtcp.deep_supervision=in_task"], "mtcp_fixed",
        "densemtl's earlier CFM, residual trace-back, deep supervision inside the task losses"),
}


def _parse_size(text: str) -> tuple[int, int]:
    height, width = text.lower().split("x")
    return int(height), int(width)


def attention_cost(sizes: list[str], attention: list[str], repeats: int) -> list[dict[str, Any]]:
    """Latency of one MT-CP forward (batch 1) and the CFM score-matrix size per attention setting."""
    from densemtl.engine.bench import dataset_info
    from densemtl.models import build_model
    from densemtl.models.mtcp import key_grid
    from densemtl.tasks import build_tasks

    rows = []
    for size in sizes:
        height, width = _parse_size(size)
        for setting in attention:
            limit = None if setting == "none" else int(setting)
            config = load_config(MTCP_CONFIG, [f"mtcp.attention_size={'null' if limit is None else limit}"])
            info = dataset_info(config)
            model = build_model(config, info, build_tasks(list(config.data.tasks), info)).eval()
            image = torch.randn(1, 3, height, width)
            queries = -(-height // 32) * 8 * (-(-width // 32) * 8)  # the 1/4 map of the padded image
            grid = key_grid(-(-height // 32) * 8, -(-width // 32) * 8, limit)
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


def _train_records(root: Path, label: str, seed: int) -> list[dict[str, Any]]:
    lines = (root / f"seed{seed}" / label / "log.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "train"]


def lps_weights(summary: dict[str, Any], root: Path) -> dict[str, Any]:
    """Per LPS variant and task: the logged weight at the last step (mean over seeds), the smallest and
    largest logged after the first window, and how many logged steps had some weight below 0.0101 (at or
    under the default floor). Each logged weight is the mean over its logging interval."""
    table: dict[str, Any] = {}
    for label in summary["variants"]:
        if "loss.balancer=lps" not in VARIANTS[label].overrides:
            continue
        runs = [_train_records(root, label, seed) for seed in summary["seeds"]]
        tasks = [key.removeprefix("weight/") for key in runs[0][0] if key.startswith("weight/")]
        later = [r for records in runs for r in records if r["step"] > 25]
        table[label] = {
            "last": {t: statistics.mean(records[-1][f"weight/{t}"] for records in runs) for t in tasks},
            "min": {t: min(r[f"weight/{t}"] for r in later) for t in tasks},
            "max": {t: max(r[f"weight/{t}"] for r in later) for t in tasks},
            "steps_at_or_below_floor": sum(any(r[f"weight/{t}"] < 0.0101 for t in tasks) for r in later),
            "steps_logged": len(later),
        }
        print(label, json.dumps(table[label]))
    return table


def plot_comparison(summary: dict[str, Any], root: Path, path: Path) -> None:
    """Delta-m of every variant (one dot per seed, a bar at the mean) and the LPS variants' weights."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise SystemExit("--plot needs matplotlib: pip install 'densemtl[plots]'") from err
    variants = {k: v for k, v in summary["variants"].items() if k != "single"}
    seed = summary["seeds"][0]
    weights: dict[str, list[dict[str, Any]]] = {}  # LPS variants whose weights move
    for label in variants:
        if "loss.balancer=lps" in VARIANTS[label].overrides:
            records = _train_records(root, label, seed)
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
    left.set_ylabel("Delta-m vs single-task networks (%)")
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
    add_arguments(parser, list(VARIANTS))
    parser.add_argument("--plot", type=Path, help="with --compare: PNG of Delta-m per variant and the LPS weights")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.commands or args.compare:
        result = run_family(args, VARIANTS)
        if result is None:
            return
        result["lps_weights"] = lps_weights(result, args.root)
        if args.plot:
            plot_comparison(result, args.root, args.plot)
    else:
        result = {"attention": attention_cost(args.sizes, args.attention, args.repeats), "threads": args.threads}
    write_json(result, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
