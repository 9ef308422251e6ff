"""Parameters, GFLOPs, latency and throughput of the reference model configurations.

Runs :func:`densemtl.engine.bench.run_bench` on the default CPU config (``resnet-tiny``) and on a
ViT-S/16 config at the synthetic size (96x128) and at the NYUD training size (448x576), and writes
all figures to one JSON file. Usage::

    OMP_NUM_THREADS=1 python benchmarks/models.py --out runs/bench/models.json [--repeats 10]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from densemtl.config import load_config
from densemtl.engine.bench import run_bench
from densemtl.jsonio import write_json

CASES = {
    "default-96x128": [],
    "vit-s-96x128": ["model.backbone=vit-s"],
    "vit-s-448x576": ["model.backbone=vit-s", "data.crop_size=[448,576]", "data.eval_batch_size=2"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/bench/models.json")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", default="auto", help="train.device for every case")
    args = parser.parse_args()
    out = Path(args.out)
    results = {}
    for name, overrides in CASES.items():
        config = load_config(None, [*overrides, f"train.device={args.device}", f"name={name}"])
        results[name] = run_bench(config, out.with_name(f"{out.stem}-{name}.json"), args.repeats)
    write_json(results, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
