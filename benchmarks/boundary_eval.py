"""Boundary evaluation speed and matcher agreement on realistic maps.

Ground truth: the boundaries of a random smooth label map (one-pixel wide, as SEISM's ``seg2bmap``).
Prediction: a noisy version of it, as a trained network outputs: the label map warped by a smooth random
field (boundaries a few pixels off), blurred, with a slowly varying strength (weak and missed segments)
and faint clutter boundaries of another label map.

Reports, per image: the exact matcher's time for all thresholds (wall and CPU seconds, split into NMS,
thinning and matching), and with ``pyEdgeEval`` installed the BSDS kernel's time per threshold and both
matchers' ODS/OIS/AP side by side (at a smaller size, the BSDS kernel being slow).

    python benchmarks/boundary_eval.py --out runs/bench/boundary_eval.json
"""

from __future__ import annotations

import argparse
import importlib.util
import time

import numpy as np
from scipy import ndimage

from densemtl.jsonio import write_json
from densemtl.metrics.boundary import BoundaryMetric, threshold_levels
from densemtl.metrics.boundary_match import bsds_counts, exact_counts
from densemtl.metrics.edge_nms import thinned_levels


def random_regions(rng: np.random.Generator, height: int, width: int, regions: int, smooth: float) -> np.ndarray:
    """A label map: argmax over ``regions`` smoothed noise fields (blob-like regions)."""
    fields = ndimage.gaussian_filter(rng.normal(size=(regions, height, width)), (0, smooth, smooth))
    return fields.argmax(axis=0)


def boundaries(labels: np.ndarray) -> np.ndarray:
    edges = np.zeros(labels.shape, dtype=bool)
    edges[:-1, :] |= labels[:-1, :] != labels[1:, :]
    edges[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    return edges


def noisy_pair(
    seed: int, height: int, width: int, regions: int = 40, smooth: float = 18.0
) -> tuple[np.ndarray, np.ndarray]:
    """(soft prediction in [0, 1], ground-truth boundary mask) of one synthetic image.

    The default 40 regions give about 22k ground-truth boundary pixels at 480 x 640 (a dense NYUD map).
    """
    rng = np.random.default_rng(seed)
    scale = min(height, width) / 480
    labels = random_regions(rng, height, width, regions, smooth * scale)
    gt = boundaries(labels)
    displacement = ndimage.gaussian_filter(rng.normal(size=(2, height, width)), (0, 25 * scale, 25 * scale))
    displacement *= 3 * scale / displacement.std()
    coords = np.mgrid[:height, :width] + displacement
    warped = ndimage.map_coordinates(labels, coords, order=0, mode="nearest")
    strength = ndimage.gaussian_filter(rng.normal(size=(height, width)), 30 * scale)
    strength = np.clip(0.6 + strength / strength.std() * 0.35, 0.0, 1.0)
    clutter = boundaries(random_regions(rng, height, width, 6, 30 * scale)) * 0.3 * rng.random()
    soft = ndimage.gaussian_filter(boundaries(warped) * strength + clutter, 1.5 * max(scale, 0.5))
    soft = soft / max(soft.max(), 1e-6) + 0.005 * rng.random((height, width))
    return np.clip(soft, 0, 1).astype(np.float32), gt


def time_exact(soft: np.ndarray, gt: np.ndarray, max_dist: float, thresholds: np.ndarray) -> dict[str, float]:
    """Stage timings (wall seconds) and the total CPU time of the exact evaluation of one image."""
    cpu = time.process_time()
    start = time.perf_counter()
    edges = quantize(edge_nms(soft, min_value=0.5 / 255))
    nms_done = time.perf_counter()
    levels = thinned_levels(edges, thresholds)
    thin_done = time.perf_counter()
    exact_counts(levels, gt, max_dist * float(np.hypot(*gt.shape)))
    end = time.perf_counter()
    return {
        "total_s": end - start,
        "cpu_s": time.process_time() - cpu,
        "nms_s": nms_done - start,
        "thinning_s": thin_done - nms_done,
        "matching_s": end - thin_done,
        "gt_pixels": int(gt.sum()),
        "pred_pixels_lowest_threshold": int(levels[0].size),
    }


def time_bsds_kernel(soft: np.ndarray, gt: np.ndarray, max_dist: float, probe: list[float]) -> dict[str, float]:
    """Mean wall and CPU seconds of one BSDS ``correspond_pixels`` call at the ``probe`` thresholds."""
    levels = thinned_levels(quantize(edge_nms(soft, min_value=0.5 / 255)), np.array(probe))
    cpu, start = time.process_time(), time.perf_counter()
    bsds_counts(levels, gt, max_dist)
    return {"wall_s": (time.perf_counter() - start) / len(probe), "cpu_s": (time.process_time() - cpu) / len(probe)}


def compare_matchers(images: int, size: tuple[int, int], max_dist: float, thresholds: int, regions: int) -> dict:
    """ODS/OIS/AP and time per image of both matchers on the same images."""
    out = {}
    pairs = [noisy_pair(1000 + seed, *size, regions=regions) for seed in range(images)]
    for matcher in ("exact", "bsds"):
        metric = BoundaryMetric(max_dist=max_dist, thresholds=thresholds, matcher=matcher)
        cpu, start = time.process_time(), time.perf_counter()
        for soft, gt in pairs:
            metric.update(soft[None, None], gt[None, None].astype(np.float32))
        out[matcher] = {
            **metric.compute(),
            "wall_s_per_image": (time.perf_counter() - start) / images,
            "cpu_s_per_image": (time.process_time() - cpu) / images,
        }
        print(f"  {matcher:<6} " + "  ".join(f"{k}={v:.3f}" for k, v in out[matcher].items()))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5, help="images timed at full size")
    parser.add_argument("--size", type=int, nargs=2, default=[480, 640], metavar=("H", "W"))
    parser.add_argument("--max-dist", type=float, default=0.011, help="tolerance, fraction of the diagonal")
    parser.add_argument("--thresholds", type=int, default=99)
    parser.add_argument("--regions", type=int, default=40, help="regions per synthetic label map")
    parser.add_argument("--compare-images", type=int, default=3, help="images for the exact vs bsds comparison")
    parser.add_argument("--compare-size", type=int, nargs=2, default=[240, 320], metavar=("H", "W"))
    parser.add_argument("--out", default="runs/bench/boundary_eval.json")
    args = parser.parse_args()

    thresholds = threshold_levels(args.thresholds)
    pairs = [noisy_pair(seed, *args.size, regions=args.regions) for seed in range(args.images)]
    runs = [time_exact(soft, gt, args.max_dist, thresholds) for soft, gt in pairs]
    summary = {key: float(np.mean([run[key] for run in runs])) for key in runs[0]}
    print(f"exact matcher, {args.size[0]}x{args.size[1]}, {args.thresholds} thresholds, maxDist {args.max_dist}:")
    for key, value in summary.items():
        print(f"  {key:<30} {value:10.3f}")
    report = {"size": args.size, "thresholds": args.thresholds, "max_dist": args.max_dist, "exact": summary,
              "exact_per_image": runs}
    if importlib.util.find_spec("pyEdgeEval") is not None and args.compare_images > 0:
        soft, gt = pairs[0]
        per_call = time_bsds_kernel(soft, gt, args.max_dist, [0.2, 0.5])
        report["bsds_kernel_per_threshold"] = per_call
        print(f"bsds kernel, one threshold at {args.size[0]}x{args.size[1]}: "
              f"{per_call['wall_s']:.3f} s wall, {per_call['cpu_s']:.3f} s CPU")
        print(f"exact vs bsds on {args.compare_images} images of {args.compare_size[0]}x{args.compare_size[1]}:")
        report["comparison"] = {
            "size": args.compare_size,
            "images": args.compare_images,
            **compare_matchers(
                args.compare_images, tuple(args.compare_size), args.max_dist, args.thresholds, args.regions
            ),
        }
    elif args.compare_images > 0:
        print("pyEdgeEval not installed (pip install 'densemtl[bsds]'): no bsds figures")
    print(f"wrote {write_json(report, args.out)}")


if __name__ == "__main__":
    main()
