"""Milliseconds per sample of the NYUD-v2 and PASCAL-Context loaders at the real image sizes.

Writes small folders in the real layouts (the test fixtures' writers, at 480x640 for NYUD_MT, 425x560 for
NYUDv2, 375x500 for PASCAL-Context) to a temporary folder, then times decoding (``load_raw``: files to
arrays, PASCAL's LabelMap edges and thinning included) and a full training sample (decoding plus the
joint transforms with the recipe's crop). One process, no DataLoader workers. Usage::

    OMP_NUM_THREADS=1 python benchmarks/data_loading.py --out runs/bench/data_loading.json [--samples 8]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the fixture writers live in tests/

from densemtl.config import DataConfig  # noqa: E402
from densemtl.data.nyud import NYUDDataset  # noqa: E402
from densemtl.data.pascal import PascalContextDataset  # noqa: E402
from densemtl.jsonio import write_json
from tests.dataset_fixtures import write_nyud, write_pascal  # noqa: E402

CASES = {  # name: (dataset class, writer, size, tasks, crop)
    "nyud_mt_480x640": (NYUDDataset, lambda root, n, h, w: write_nyud(root, "NYUD_MT", {"train": n}, h, w),
                        (480, 640), ["semseg", "depth", "normals", "edge"], [448, 576]),
    "nyudv2_425x560": (NYUDDataset, lambda root, n, h, w: write_nyud(root, "NYUDv2", {"train": n}, h, w),
                       (425, 560), ["semseg", "depth", "normals", "edge"], [448, 576]),
    "pascal_375x500": (PascalContextDataset, lambda root, n, h, w: write_pascal(root, {"train": n}, h, w, 0, ()),
                       (375, 500), ["semseg", "human_parts", "normals", "saliency", "edge"], [512, 512]),
}


def _median_ms(function, count: int) -> float:
    times = []
    for index in range(count):
        start = time.perf_counter()
        function(index)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/bench/data_loading.json")
    parser.add_argument("--samples", type=int, default=8)
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name, (cls, write, (height, width), tasks, crop) in tqdm(CASES.items(), desc="datasets"):
            root = Path(scratch) / name
            write(root, args.samples, height, width)
            config = DataConfig(dataset=cls.dataset_name, root=str(root), tasks=tasks, crop_size=crop,
                                scale_range=[0.5, 2.0])
            dataset = cls(config, "train", train=True)
            dataset.load_raw(0)  # warm-up (imports, caches)
            results[name] = {
                "decode_ms": round(_median_ms(dataset.load_raw, len(dataset)), 2),
                "train_sample_ms": round(_median_ms(dataset.__getitem__, len(dataset)), 2),
                "tasks": tasks,
                "samples": len(dataset),
            }
            print(f"{name:18s} decode {results[name]['decode_ms']:7.1f} ms   "
                  f"train sample {results[name]['train_sample_ms']:7.1f} ms")
    print(f"wrote {write_json(results, args.out)}")


if __name__ == "__main__":
    main()
