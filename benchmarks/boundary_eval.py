"""Boundary evaluation speed per protocol, matcher agreement, and a NYUD-v2-sized split scored end to end.

Maps (480 x 640 by default, ground truth = the boundaries of a random smooth label map, one pixel wide
and about 22k pixels, a dense NYUD map):

* ``clean``: a trained network's view of the ground truth: the label map warped by a smooth random field
  (boundaries a few pixels off), blurred, with a slowly varying strength (weak and missed segments) and
  faint boundaries of another label map;
* ``cluttered``: the same plus low-level clutter everywhere (blurred noise, |N| x ``--clutter``), the kind of
  map whose old pure-Python matching cost seconds per image;
* ``model`` (with ``--checkpoint CKPT --photos DIR``): a trained model's edge maps on real photos, scored
  against their own thinned confident edges (``thin(nms(p) > 0.5)``).

Reported per protocol (``seism-hed``, ``invpt``, ``mtlpt``) and map kind: CPU seconds per image for the
protocol's map (smoothing, NMS, 8-bit steps), the thinning of every threshold, and the exact matching, and
the fraction of pixels left after thinning at a few thresholds (the clutter statistics). With ``pyEdgeEval``
installed: the BSDS kernel's time per threshold and both matchers' ODS/OIS/AP side by side.

``--split DIR`` writes (once; reused when present) a NYUD-v2-sized split in the ``NYUDv2`` layout, 654
images of 480 x 640 (sizes must be multiples of 16) with semseg, depth (16-bit PNG), normals and edges,
and imperfect predictions of all four tasks (edges: ``--split-clutter`` maps), then times ``densemtl evaluate
--predictions`` on it with ``--workers`` processes: wall seconds, and CPU seconds of this process and its
workers together.

    python benchmarks/boundary_eval.py --out runs/bench/boundary_eval.json
    python benchmarks/boundary_eval.py --images 0 --split runs/bench/nyud_split --workers 2
"""

from __future__ import annotations

import argparse
import importlib.util
import resource
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

from densemtl.jsonio import write_json
from densemtl.metrics.boundary import BoundaryMetric
from densemtl.metrics.boundary_match import bsds_counts, exact_counts
from densemtl.metrics.edge_nms import conv_tri, edge_nms, thin, thinned_levels
from densemtl.metrics.edge_protocols import EDGE_PROTOCOLS, EdgeProtocol, seism_hed_values

LEVEL_PROBES = (0.01, 0.1, 0.3, 0.5, 0.7, 0.9)  # thresholds at which the thinned pixel fraction is reported


def smooth_noise(rng: np.random.Generator, count: int, height: int, width: int, sigma: float) -> np.ndarray:
    """``count`` Gaussian-smoothed noise fields, drawn at a resolution reduced to ~4 samples per sigma and
    interpolated back (the same look as smoothing at full size, at a fraction of the cost)."""
    step = max(1, int(sigma // 4))
    small = (-(-height // step), -(-width // step))
    fields = ndimage.gaussian_filter(rng.normal(size=(count, *small)), (0, sigma / step, sigma / step))
    if step == 1:
        return fields
    zoomed = torch.nn.functional.interpolate(torch.from_numpy(fields)[None], size=(height, width), mode="bilinear")
    return zoomed[0].numpy()


def random_regions(rng: np.random.Generator, height: int, width: int, regions: int, smooth: float) -> np.ndarray:
    """A label map: argmax over ``regions`` smoothed noise fields (blob-like regions)."""
    return smooth_noise(rng, regions, height, width, smooth).argmax(axis=0)


def boundaries(labels: np.ndarray) -> np.ndarray:
    edges = np.zeros(labels.shape, dtype=bool)
    edges[:-1, :] |= labels[:-1, :] != labels[1:, :]
    edges[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    return edges


def predicted_boundaries(rng: np.random.Generator, labels: np.ndarray, clutter: float = 0.0) -> np.ndarray:
    """A soft map as a network outputs it for the boundaries of ``labels`` (see the module docstring)."""
    height, width = labels.shape
    scale = min(height, width) / 480
    displacement = smooth_noise(rng, 2, height, width, 25 * scale)
    displacement *= 3 * scale / displacement.std()
    warped = ndimage.map_coordinates(labels, np.mgrid[:height, :width] + displacement, order=0, mode="nearest")
    strength = smooth_noise(rng, 1, height, width, 30 * scale)[0]
    strength = np.clip(0.6 + strength / strength.std() * 0.35, 0.0, 1.0)
    faint = boundaries(random_regions(rng, height, width, 6, 30 * scale)) * 0.3 * rng.random()
    soft = ndimage.gaussian_filter(boundaries(warped) * strength + faint, 1.5 * max(scale, 0.5))
    soft = soft / max(soft.max(), 1e-6) + 0.005 * rng.random((height, width))
    if clutter:
        noise = ndimage.gaussian_filter(rng.normal(size=(height, width)), 1.5)
        soft = 0.8 * soft + clutter * np.abs(noise) / noise.std()
    return np.clip(soft, 0, 1).astype(np.float32)


def noisy_pair(
    seed: int, height: int, width: int, regions: int = 40, smooth: float = 18.0, clutter: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """(soft prediction in [0, 1], ground-truth boundary mask) of one synthetic image."""
    rng = np.random.default_rng(seed)
    labels = random_regions(rng, height, width, regions, smooth * min(height, width) / 480)
    return predicted_boundaries(rng, labels, clutter), boundaries(labels)


def model_pairs(checkpoint: Path, images: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """A trained model's edge maps on the photos in ``images``, each with its own thinned confident edges."""
    from densemtl.data.transforms import normalize_image
    from densemtl.engine.checkpoint import load_model
    from densemtl.engine.predict import read_image

    loaded = load_model(checkpoint, torch.device("cpu"))
    pairs = []
    for path in sorted(p for p in images.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png")):
        with torch.no_grad():
            raw = loaded.model(normalize_image(read_image(path))[None])["pred"]
        soft = loaded.tasks["edge"].predict(raw["edge"].float())[0, 0].numpy()
        pairs.append((soft, thin(edge_nms(conv_tri(soft, 1)) > 0.5)))
    return pairs


def time_protocol(soft: np.ndarray, gt: np.ndarray, max_dist: float, protocol: EdgeProtocol) -> dict[str, float]:
    """CPU seconds of each stage of one image's evaluation, and thinned pixel fractions at LEVEL_PROBES."""
    thresholds = np.array(protocol.thresholds)
    start = time.process_time()
    values = protocol.values(soft)
    mapped = time.process_time()
    levels = thinned_levels(values, thresholds, strict=protocol.strict)
    thinned = time.process_time()
    exact_counts(levels, gt, max_dist * float(np.hypot(*gt.shape)))
    matched = time.process_time()
    probes = np.searchsorted(thresholds, LEVEL_PROBES)
    return {
        "map_s": mapped - start,
        "thinning_s": thinned - mapped,
        "matching_s": matched - thinned,
        "total_s": matched - start,
        **{f"thinned_fraction_at_{t}": levels[i].size / gt.size for t, i in zip(LEVEL_PROBES, probes, strict=True)},
    }


def time_protocols(pairs: list[tuple[np.ndarray, np.ndarray]], max_dist: float, label: str) -> dict[str, dict]:
    """Per protocol: the mean (and the slowest image's total) over ``pairs``."""
    report = {}
    for name, protocol in EDGE_PROTOCOLS.items():
        runs = [time_protocol(soft, gt, max_dist, protocol) for soft, gt in pairs]
        summary = {key: float(np.mean([run[key] for run in runs])) for key in runs[0]}
        summary["slowest_total_s"] = float(max(run["total_s"] for run in runs))
        report[name] = summary
        print(f"  {label:<10} {name:<10} " + "  ".join(
            f"{key}={summary[key]:.3f}" for key in ("map_s", "thinning_s", "matching_s", "total_s", "slowest_total_s")
        ) + "  thinned fraction " + " ".join(f"{summary[f'thinned_fraction_at_{t}']:.4f}" for t in LEVEL_PROBES))
    return report


def time_bsds_kernel(soft: np.ndarray, gt: np.ndarray, max_dist: float, probe: list[float]) -> dict[str, float]:
    """Mean wall and CPU seconds of one BSDS ``correspond_pixels`` call at the ``probe`` thresholds."""
    levels = thinned_levels(seism_hed_values(soft), np.array(probe))
    cpu, start = time.process_time(), time.perf_counter()
    bsds_counts(levels, gt, max_dist)
    return {"wall_s": (time.perf_counter() - start) / len(probe), "cpu_s": (time.process_time() - cpu) / len(probe)}


def compare_matchers(images: int, size: tuple[int, int], max_dist: float, thresholds: int, regions: int) -> dict:
    """ODS/OIS/AP and time per image of both matchers on the same images (seism-hed protocol)."""
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


# --- a NYUD-v2-sized split, ground truth and predictions ---------------------------------------------------


def _png(array: np.ndarray, path: Path) -> None:
    Image.fromarray(array).save(path, compress_level=1)


def write_frame(root: Path, name: str, seed: int, size: tuple[int, int], clutter: float) -> None:
    """One frame in the ``NYUDv2`` layout and its predictions under ``root/pred``: labels from a smooth random
    map (drawn at a quarter of the size), piecewise smooth depth, per-region normals, one-pixel edges."""
    height, width = size
    rng = np.random.default_rng(seed)
    coarse = random_regions(rng, height // 4, width // 4, 40, 4.5)
    labels = np.kron(coarse, np.ones((4, 4), dtype=coarse.dtype))
    semseg = (labels % 40 + 1).astype(np.uint8)
    semseg[rng.random(size) < 0.02] = 0  # void pixels
    depth = 1.0 + 6.0 * ndimage.zoom(ndimage.gaussian_filter(rng.random((height // 16, width // 16)), 2), 16, order=1)
    depth += 0.3 * rng.random(40)[labels]
    directions = rng.normal(size=(40, 3)) + np.array([0.0, 0.0, 2.0])
    normals = directions[labels] / np.linalg.norm(directions[labels], axis=2, keepdims=True)
    colours = rng.integers(0, 256, size=(40, 3), dtype=np.uint8)
    edge = boundaries(labels)
    _png(colours[labels], root / "images" / f"{name}.png")
    _png(semseg, root / "segmentation" / f"{name}.png")
    _png(np.rint(depth * 1000).astype(np.uint16), root / "depth" / f"{name}.png")
    _png(np.rint((normals + 1) * 127.5).astype(np.uint8), root / "normals" / f"{name}.png")
    _png(edge.astype(np.uint8) * 255, root / "edge" / f"{name}.png")
    pred = root / "pred"
    wrong = rng.random(size) < 0.2
    guess = np.where(wrong, rng.integers(0, 40, size=size), labels % 40).astype(np.uint8)
    noisy_depth = depth * (1 + 0.1 * ndimage.gaussian_filter(rng.normal(size=size), 3))
    noisy_normals = normals + 0.15 * rng.normal(size=normals.shape)
    noisy_normals /= np.linalg.norm(noisy_normals, axis=2, keepdims=True)
    _png(guess, pred / "semseg" / f"{name}.png")
    _png(np.clip(np.rint(noisy_depth * 1000), 0, 65535).astype(np.uint16), pred / "depth" / f"{name}.png")
    _png(np.clip(np.rint((noisy_normals + 1) * 127.5), 1, 255).astype(np.uint8), pred / "normals" / f"{name}.png")
    soft = predicted_boundaries(rng, labels, clutter)
    _png(np.rint(soft * 255).astype(np.uint8), pred / "edge" / f"{name}.png")


def write_split(root: Path, images: int, size: tuple[int, int], clutter: float, workers: int) -> None:
    """The split under ``root`` (skipped when ``root/gt_sets/val.txt`` lists ``images`` names already)."""
    names = [f"{index:04d}" for index in range(images)]
    split_file = root / "gt_sets" / "val.txt"
    if split_file.is_file() and split_file.read_text().split() == names:
        print(f"split: reusing {root}")
        return
    for folder in ("images", "segmentation", "depth", "normals", "edge", "gt_sets", *(
            f"pred/{task}" for task in ("semseg", "depth", "normals", "edge"))):
        (root / folder).mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with ProcessPoolExecutor(max_workers=workers) as pool:
        list(pool.map(write_frame, [root] * images, names, range(images), [size] * images, [clutter] * images))
    (root / "gt_sets" / "train.txt").write_text(names[0] + "\n")
    split_file.write_text("\n".join(names) + "\n")
    print(f"split: wrote {images} frames to {root} in {time.perf_counter() - start:.0f} s")


def time_split(root: Path, workers: int | None, protocol: str) -> dict:
    """Wall and CPU seconds (this process and its workers) of ``densemtl evaluate --predictions`` on ``root``."""
    from densemtl.engine.evaluate import available_cores, evaluate_predictions

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    results = evaluate_predictions(root / "pred", "nyud", root, split="val", edge_protocol=protocol, workers=workers)
    wall = time.perf_counter() - start
    own_end, children_end = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = sum(
        end.ru_utime + end.ru_stime - begin.ru_utime - begin.ru_stime
        for begin, end in ((own, own_end), (children, children_end))
    )
    report = {"workers": workers or available_cores(), "edge_protocol": protocol, "wall_s": wall, "cpu_s": cpu,
              "results": results}
    print(f"split: {report['workers']} workers, {protocol}: {wall:.1f} s wall, {cpu:.1f} s CPU")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=3, help="synthetic images per map kind (0: none)")
    parser.add_argument("--size", type=int, nargs=2, default=[480, 640], metavar=("H", "W"))
    parser.add_argument("--max-dist", type=float, default=0.011, help="tolerance, fraction of the diagonal")
    parser.add_argument("--regions", type=int, default=40, help="regions per synthetic label map")
    parser.add_argument("--clutter", type=float, default=0.1, help="amplitude of the cluttered maps' noise")
    parser.add_argument("--checkpoint", type=Path, help="with --photos: time a trained model's edge maps")
    parser.add_argument("--photos", type=Path, help="folder of photos for --checkpoint")
    parser.add_argument("--compare-images", type=int, default=3, help="images for the exact vs bsds comparison")
    parser.add_argument("--compare-size", type=int, nargs=2, default=[240, 320], metavar=("H", "W"))
    parser.add_argument("--split", type=Path, help="folder of the NYUD-sized split to write (once) and score")
    parser.add_argument("--split-images", type=int, default=654)
    parser.add_argument("--split-clutter", type=float, default=0.02,
                        help="noise amplitude of the split's edge predictions (0.02: maps like the issue's blurred, "
                        "noisy ones, seconds per image for the former pure-Python matcher)")
    parser.add_argument("--workers", type=int, default=None, help="--split scoring processes (default: the cores)")
    parser.add_argument("--edge-protocol", default="seism-hed", choices=list(EDGE_PROTOCOLS))
    parser.add_argument("--out", default="runs/bench/boundary_eval.json")
    args = parser.parse_args()

    report: dict = {"size": args.size, "max_dist": args.max_dist, "protocols": {}}
    print(f"CPU seconds per image, {args.size[0]}x{args.size[1]}, maxDist {args.max_dist}:")
    kinds = {
        "clean": [noisy_pair(seed, *args.size, regions=args.regions) for seed in range(args.images)],
        "cluttered": [noisy_pair(seed, *args.size, regions=args.regions, clutter=args.clutter)
                      for seed in range(args.images)],
    }
    if args.checkpoint is not None:
        kinds["model"] = model_pairs(args.checkpoint, args.photos)
    for kind, pairs in kinds.items():
        if pairs:
            report["protocols"][kind] = time_protocols(pairs, args.max_dist, kind)
    if importlib.util.find_spec("pyEdgeEval") is not None and args.compare_images > 0 and kinds["clean"]:
        soft, gt = kinds["clean"][0]
        per_call = time_bsds_kernel(soft, gt, args.max_dist, [0.2, 0.5])
        report["bsds_kernel_per_threshold"] = per_call
        print(f"bsds kernel, one threshold at {args.size[0]}x{args.size[1]}: "
              f"{per_call['wall_s']:.3f} s wall, {per_call['cpu_s']:.3f} s CPU")
        print(f"exact vs bsds on {args.compare_images} images of {args.compare_size[0]}x{args.compare_size[1]}:")
        report["comparison"] = {
            "size": args.compare_size,
            "images": args.compare_images,
            **compare_matchers(args.compare_images, tuple(args.compare_size), args.max_dist, 99, args.regions),
        }
    elif args.compare_images > 0:
        print("pyEdgeEval not installed (pip install 'densemtl[bsds]'): no bsds figures")
    if args.split is not None:
        from densemtl.engine.evaluate import available_cores

        write_split(args.split, args.split_images, tuple(args.size), args.split_clutter,
                    args.workers or available_cores())
        report["split"] = time_split(args.split, args.workers, args.edge_protocol)
    print(f"wrote {write_json(report, args.out)}")


if __name__ == "__main__":
    main()
