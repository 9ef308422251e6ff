"""The contrastive regularizer: cost per training step, and the synthetic comparison of its variants.

Default (what ``make bench`` runs): milliseconds per step (median over repeats) of the model with and
without it, and of it alone, written as JSON. Random images and labels in the synthetic dataset's
format, so nothing has to be generated or read from disk.

    python benchmarks/contrastive.py --out runs/bench/contrastive.json [--set contrastive.num_pixels=512]

The comparison (``--commands`` / ``--compare``, see ``benchmarks/comparison.py``) trains the shared
references and the regularizer's variants on configs/synthetic_contrastive.yaml:

    python benchmarks/contrastive.py --compare --seeds 0 1 2 --steps 300 --root runs/compare \
        --out runs/compare/contrastive.json
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from comparison import CONFIGS, REFERENCES, Variant, add_arguments, run_family, same_training
from tqdm import tqdm

from densemtl.config import load_config
from densemtl.dataset_info import DatasetInfo
from densemtl.jsonio import write_json
from densemtl.losses.contrastive import ContrastiveRegularizer
from densemtl.models import build_model
from densemtl.tasks import build_tasks

CONFIG = CONFIGS / "synthetic_contrastive.yaml"

# label -> variant; the shared encoder of REFERENCES is this config with the regularizer off
VARIANTS: dict[str, Variant] = {
    **REFERENCES,
    "contrastive_triplet": Variant(CONFIG, [], "shared_encoder", "default: triplet, sampled triplets, margin 0.3"),
    "contrastive_batch_hard": Variant(CONFIG, ["contrastive.mining=batch_hard"], "shared_encoder",
                                      "triplet with the hardest positive and negative of each anchor"),
    "contrastive_infonce": Variant(CONFIG, ["contrastive.loss=infonce"], "shared_encoder",
                                   "InfoNCE, temperature 0.1"),
}


def random_batch(tasks: list[str], batch: int, height: int, width: int, classes: int) -> dict[str, torch.Tensor]:
    """Labels with the value ranges and invalid regions of real ones."""
    labels = {
        "image": torch.randn(batch, 3, height, width),
        "semseg": torch.randint(0, classes, (batch, height, width)),
        "depth": torch.rand(batch, 1, height, width) * 5,
        "normals": F.normalize(torch.randn(batch, 3, height, width), dim=1),
        "edge": (torch.rand(batch, 1, height, width) > 0.9).float(),
        "saliency": (torch.rand(batch, 1, height, width) > 0.5).float(),
    }
    return {key: value for key, value in labels.items() if key == "image" or key in tasks}


def timed(step, repeats: int, label: str) -> float:
    """Median wall-clock milliseconds of ``step()`` after one warm-up call."""
    step()
    times = []
    for _ in tqdm(range(repeats), desc=label, leave=False):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="YAML config (default: the built-in defaults)")
    parser.add_argument("--set", nargs="*", default=[], help="dotted overrides, e.g. contrastive.num_pixels=512")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--height", type=int, default=96)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="runs/bench/contrastive.json")
    add_arguments(parser, list(VARIANTS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.commands or args.compare:
        if not same_training(REFERENCES["shared_encoder"], Variant(CONFIG, ["contrastive.enabled=false"])):
            raise SystemExit(f"{CONFIG.name} without the regularizer no longer trains the shared reference run")
        summary = run_family(args, VARIANTS)
        if summary is not None:
            print(f"wrote {write_json(summary, args.out)}")
        return
    torch.manual_seed(0)

    config = load_config(args.config, ["contrastive.enabled=true", *args.set])
    names = config.data.tasks
    classes = 8
    info = DatasetInfo("random", tuple(names), num_classes={"semseg": classes, "human_parts": 7})
    tasks = build_tasks(names, info)
    model = build_model(config, info, tasks)
    regularizer = ContrastiveRegularizer(config.contrastive, tasks, model.feature_channels)
    batch = random_batch(names, args.batch, args.height, args.width, classes)

    def train_step(with_regularizer: bool) -> None:
        model.zero_grad(set_to_none=True)
        regularizer.zero_grad(set_to_none=True)
        output = model(batch["image"])
        total = sum(tasks[t].loss(output["pred"][t], batch[t]) for t in names)
        if with_regularizer:
            total = total + regularizer(output["features"], batch)
        total.backward()

    features = {t: f.detach().requires_grad_() for t, f in model(batch["image"])["features"].items()}

    def regularizer_step() -> None:
        regularizer.zero_grad(set_to_none=True)
        regularizer(features, batch).backward()

    results = {
        "tasks": names,
        "loss": config.contrastive.loss,
        "num_pixels": config.contrastive.num_pixels,
        "batch": args.batch,
        "size": [args.height, args.width],
        "feature_size": list(next(iter(features.values())).shape[-2:]),
        "threads": args.threads,
        "step_ms_without": timed(lambda: train_step(False), args.repeats, "step without"),
        "step_ms_with": timed(lambda: train_step(True), args.repeats, "step with"),
        "regularizer_ms": timed(regularizer_step, args.repeats, "regularizer alone"),
        "regularizer_params": sum(p.numel() for p in regularizer.parameters()),
        "model_params": sum(p.numel() for p in model.parameters()),
    }
    results["overhead"] = results["step_ms_with"] / results["step_ms_without"] - 1
    for key, value in results.items():
        print(f"{key:20s} {value:.4g}" if isinstance(value, float) else f"{key:20s} {value}")
    print(f"wrote {write_json(results, args.out)}")


if __name__ == "__main__":
    main()
