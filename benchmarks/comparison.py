"""Trained comparisons on the synthetic scenes, shared by ``benchmarks/mtcp.py`` and ``benchmarks/contrastive.py``.

A family is a table of variants (label -> config file and overrides) trained at one budget (steps, seeds)
and scored on the test split at the last step (no checkpoint selection). Every family carries the same
references, so the Delta-m of every row is against the same single-task networks: ``single`` (one
complete network per task, trained in one run), ``shared_encoder`` (the shared-encoder baseline) and
``shared_encoder_wide`` (the same with a wider neck and heads, within 10 % of MT-CP's parameters).
Run directories are ``<root>/seed<s>/<label>``; a run whose ``results.json`` exists is reused, so the
references are trained once for both families.

    python benchmarks/mtcp.py --commands --seeds 0 1 2 --steps 300 --root runs/compare   # one line per run
    python benchmarks/mtcp.py --compare --seeds 0 1 2 --steps 300 --root runs/compare    # train the rest, summarise

The summary gives, per variant, each task's primary metric and Delta-m (mean ± standard deviation over
seeds), the paired difference of Delta-m to the variant's baseline on the same seeds (``--baseline`` takes
one row as every variant's), and whether that
difference is outside the seed noise: the same sign on every seed and a mean larger than the standard
deviation of the paired differences.
"""

from __future__ import annotations

import json
import shlex
import statistics
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from densemtl.config import load_config
from densemtl.tasks import TASKS

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
MTCP_CONFIG = CONFIGS / "synthetic_mtcp.yaml"


@dataclass(frozen=True)
class Variant:
    """One row: a config and its overrides, and the row its paired difference is taken against."""

    config: Path
    overrides: list[str]
    baseline: str | None = "shared_encoder"
    note: str = ""
    extra: list[str] = field(default_factory=list)


REFERENCES: dict[str, Variant] = {
    "single": Variant(MTCP_CONFIG, ["model.arch=single", "loss.balancer=fixed"], None,
                      "one complete network per task (the Delta-m reference)"),
    "shared_encoder": Variant(MTCP_CONFIG, ["model.arch=multitask", "loss.balancer=fixed"], None,
                              "shared backbone + FPN neck, light heads (32 channels)"),
    "shared_encoder_wide": Variant(
        MTCP_CONFIG, ["model.arch=multitask", "loss.balancer=fixed", "model.neck_channels=56",
                      "model.head_channels=56"], "shared_encoder",
        "the same with a 56-channel neck and heads: MT-CP's parameter count within 10 %"),
}


def same_training(first: Variant, second: Variant) -> bool:
    """Whether two variants train the same run at a comparison's budget (every section but the names)."""
    sections = ("data", "model", "loss", "train", "eval")
    configs = [load_config(v.config, [*v.overrides, *budget(0, 1)]) for v in (first, second)]
    return all(getattr(configs[0], key) == getattr(configs[1], key) for key in sections) and all(
        not c.contrastive.enabled for c in configs)


def run_dir(root: Path, label: str, seed: int) -> Path:
    return root / f"seed{seed}" / label


def budget(seed: int, steps: int) -> list[str]:
    """The overrides every run of a comparison shares besides its own."""
    return [
        f"train.seed={seed}",
        f"train.steps={steps}",
        f"train.eval_every={steps}",
        f"train.checkpoint_every={steps}",
        "data.val_split=test",  # the final results are reported; no checkpoint is selected on them
    ]


def command(variants: dict[str, Variant], label: str, seed: int, steps: int, root: Path, extra: list[str]) -> str:
    """The ``densemtl train`` line of one run (for a job queue)."""
    variant = variants[label]
    words = ["python", "-m", "densemtl.cli", "train", str(variant.config.relative_to(CONFIGS.parent)),
             *variant.overrides, *budget(seed, steps), *extra, "--out", str(run_dir(root, label, seed))]
    return " ".join(shlex.quote(word) for word in words)


def train(variants: dict[str, Variant], label: str, seed: int, steps: int, root: Path,
          extra: list[str], reuse_only: bool = False) -> dict[str, dict[str, float]]:
    """Train one run (or reuse the finished one) and return its final test results."""
    from densemtl.engine.run import run_training

    directory = run_dir(root, label, seed)
    result_file = directory / "results.json"
    if not result_file.exists() and reuse_only:
        raise SystemExit(f"--reuse-only: {result_file} does not exist yet")
    if not result_file.exists():
        variant = variants[label]
        overrides = [*variant.overrides, *budget(seed, steps), *extra, f"out_dir={directory}", f"name={label}"]
        print(f"== {label} seed {seed}: {' '.join(overrides)}", flush=True)
        run_training(load_config(variant.config, overrides))
    return json.loads(result_file.read_text())["results"]


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def spread(values: list[float], digits: int, sign: str = "") -> str:
    """``mean ± std`` over seeds (the sample's std); the value alone for one seed."""
    mean, sd = mean_sd(values)
    return f"{mean:{sign}.{digits}f} ± {sd:.{digits}f}" if len(values) > 1 else f"{mean:{sign}.{digits}f}"


def verdict(differences: list[float], tie: float = 0.0) -> str:
    """``ahead``/``behind`` when every seed agrees in sign and the mean exceeds the spread, else noise.
    Differences within ``tie`` of 0 have no sign (variants equal up to rounding tie)."""
    mean, sd = mean_sd(differences)
    same_sign = all(d > tie for d in differences) or all(d < -tie for d in differences)
    if len(differences) > 1 and same_sign and abs(mean) > sd:
        return "ahead" if mean > 0 else "behind"
    return "inside noise"


def summarize(variants: dict[str, Variant], seeds: list[int], steps: int, root: Path, extra: list[str],
              reuse_only: bool = False) -> dict[str, Any]:
    """Per variant: metrics per seed, Delta-m per seed against ``single``, paired difference to its baseline."""
    from densemtl.engine.bench import run_bench
    from densemtl.metrics.delta_m import delta_m

    results = {label: {s: train(variants, label, s, steps, root, extra, reuse_only) for s in seeds}
               for label in variants}
    summary: dict[str, Any] = {"seeds": seeds, "steps": steps, "extra_overrides": extra, "variants": {}}
    scoring = load_config(variants["single"].config, extra).eval  # which metric each task enters Delta-m with
    for label, by_seed in results.items():
        variant = variants[label]
        tasks = list(by_seed[seeds[0]])
        deltas = [delta_m(by_seed[s], results["single"][s], eval_config=scoring) for s in seeds]
        row: dict[str, Any] = {
            "overrides": variant.overrides,
            "note": variant.note,
            "primary": {t: {"metric": TASKS[t].primary_metric,
                            "per_seed": [by_seed[s][t][TASKS[t].primary_metric] for s in seeds]} for t in tasks},
            "delta_m_per_seed": deltas,
        }
        if variant.baseline is not None:
            reference = [delta_m(results[variant.baseline][s], results["single"][s], eval_config=scoring)
                         for s in seeds]
            differences = [a - b for a, b in zip(deltas, reference, strict=True)]
            row["baseline"] = variant.baseline
            row["paired_difference_per_seed"] = differences
            row["verdict"] = verdict(differences)
        config = load_config(variant.config, variant.overrides + extra)
        figures = run_bench(config, root / "bench" / f"{label}.json", repeats=3)
        row["parameters_m"] = figures["parameters"]["total"] / 1e6
        row["gflops"] = figures["gflops"]["total"]
        summary["variants"][label] = row
    print(format_summary(summary))
    return summary


def _cell(values: list[float], digits: int, sign: str = "") -> str:
    mean, sd = mean_sd(values)
    return f"{mean:{sign}.{digits}f} ± {sd:.{digits}f}"


def format_summary(summary: dict[str, Any]) -> str:
    """Markdown: per-task primary metric and Delta-m (mean ± sd over seeds), paired difference, cost."""
    variants = summary["variants"]
    tasks = list(variants["single"]["primary"])
    header = ["variant"] + [f"{t} {variants['single']['primary'][t]['metric']}" for t in tasks]
    header += ["Delta-m %", "minus baseline (per seed)", "verdict", "params M", "GFLOPs"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, row in variants.items():
        cells = [label] + [_cell(row["primary"][t]["per_seed"], 3 if t == "depth" else 2) for t in tasks]
        cells.append(_cell(row["delta_m_per_seed"], 2, "+"))
        paired = row.get("paired_difference_per_seed")
        cells.append("" if paired is None else
                     f"{statistics.mean(paired):+.2f} vs {row['baseline']} ({' / '.join(f'{d:+.2f}' for d in paired)})")
        cells.append(row.get("verdict", ""))
        cells += [f"{row['parameters_m']:.3f}", f"{row['gflops']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def add_arguments(parser: Any, labels: list[str]) -> None:
    """The comparison's options, shared by the two benchmark scripts."""
    parser.add_argument("--compare", action="store_true", help="train what is missing and summarise (slow)")
    parser.add_argument("--commands", action="store_true", help="print one `densemtl train` line per run")
    parser.add_argument("--reuse-only", action="store_true", help="with --compare: fail instead of training")
    parser.add_argument("--root", type=Path, default=Path("runs/compare"), help="run directories of the comparison")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--variants", nargs="+", default=labels, choices=labels)
    parser.add_argument("--baseline", choices=labels,
                        help="take every row's paired difference against this row instead of its own baseline "
                             "(e.g. shared_encoder_wide: the shared encoder of matched capacity)")
    parser.add_argument("--train-set", nargs="*", default=["eval.boundary_thresholds=19"],
                        help="extra overrides for every trained run (default: 19 boundary thresholds)")


def run_family(args: Any, variants: dict[str, Variant]) -> dict[str, Any] | None:
    """``--commands`` prints the runs, ``--compare`` trains and summarises; None when neither is asked."""
    if args.baseline:
        variants = {label: replace(v, baseline=None if label == args.baseline or v.baseline is None else args.baseline)
                    for label, v in variants.items()}
    wanted = ["single", *(variants[label].baseline for label in args.variants), *args.variants]
    chosen = {label: variants[label] for label in dict.fromkeys(label for label in wanted if label)}
    if args.commands:
        for seed in args.seeds:
            for label in chosen:
                print(command(chosen, label, seed, args.steps, args.root, args.train_set))
        return None
    if args.compare:
        return summarize(chosen, args.seeds, args.steps, args.root, args.train_set, args.reuse_only)
    return None
