"""Boundary evaluation: the compiled kernels (NMS, thinning, incremental matching), ODS/OIS/AP, bsds."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
from scipy import ndimage
from scipy.sparse.csgraph import maximum_bipartite_matching
from scipy.spatial import cKDTree

from densemtl.errors import UserError
from densemtl.metrics.boundary import BoundaryMetric, average_precision, image_counts, threshold_levels
from densemtl.metrics.boundary_match import bsds_kernel, exact_counts
from densemtl.metrics.edge_nms import conv_tri, core, edge_nms, orientation, thin, thinned_levels
from densemtl.metrics.edge_protocols import EDGE_PROTOCOLS

HAS_BSDS = importlib.util.find_spec("pyEdgeEval") is not None
needs_bsds = pytest.mark.skipif(not HAS_BSDS, reason="optional pyEdgeEval (densemtl[bsds]) not installed")


def _label_boundaries(labels: np.ndarray) -> np.ndarray:
    edges = np.zeros(labels.shape, dtype=bool)
    edges[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    edges[1:, :] |= labels[1:, :] != labels[:-1, :]
    return edges


def _scene(seed: int, height: int = 60, width: int = 80) -> tuple[np.ndarray, np.ndarray]:
    """A realistic pair: boundaries of random regions (gt) and a blurred, displaced, noisy prediction."""
    rng = np.random.default_rng(seed)
    seeds = rng.integers(0, [height, width], size=(8, 2))
    yy, xx = np.mgrid[:height, :width]
    labels = ((yy[..., None] - seeds[:, 0]) ** 2 + (xx[..., None] - seeds[:, 1]) ** 2).argmin(-1)
    gt = _label_boundaries(labels)
    shift = ndimage.gaussian_filter(rng.normal(size=(2, height, width)), (0, 6, 6)) * 12
    warped = ndimage.map_coordinates(labels.astype(float), np.mgrid[:height, :width] + shift, order=0, mode="nearest")
    strength = np.clip(ndimage.gaussian_filter(rng.normal(size=(height, width)), 5) * 4 + 0.6, 0.05, 1)
    soft = ndimage.gaussian_filter(_label_boundaries(warped.astype(int)) * strength, 1.2)
    soft = soft / soft.max() + 0.05 * ndimage.gaussian_filter(rng.random((height, width)), 1)
    return np.clip(soft, 0, 1).astype(np.float32), gt


def _reference_matching(pixels: np.ndarray, gt: np.ndarray, radius: float) -> int:
    """One maximum matching with scipy's Hopcroft-Karp on a pair graph built with a k-d tree."""
    width = gt.shape[1]
    gt_pixels = np.flatnonzero(gt)
    if not pixels.size or not gt_pixels.size:
        return 0
    tree = cKDTree(np.stack(np.divmod(gt_pixels, width), axis=1))
    neighbours = tree.query_ball_point(np.stack(np.divmod(pixels, width), axis=1), radius + 1e-9)
    rows = np.repeat(np.arange(pixels.size), [len(n) for n in neighbours])
    cols = np.concatenate([np.asarray(n, dtype=np.int64) for n in neighbours])
    graph = sp.csr_matrix((np.ones(rows.size), (rows, cols)), shape=(pixels.size, gt_pixels.size))
    return int((maximum_bipartite_matching(graph, perm_type="column") >= 0).sum())


def test_thin_bar_to_line() -> None:
    mask = np.zeros((9, 20), dtype=bool)
    mask[3:6, 2:18] = True
    thinned = thin(mask)
    assert thinned.sum() < mask.sum() and thinned[thinned.any(1)].shape[0] == 1  # a single row remains
    assert np.array_equal(thin(thinned), thinned)


@pytest.mark.parametrize("strict", [False, True])
def test_thinned_levels_equal_thin_of_each_threshold(strict: bool) -> None:
    soft, _ = _scene(3)
    values = np.round(edge_nms(conv_tri(soft, 1)) * 255) / 255
    values[30, 5:70] = 51 / 255  # a line exactly at the threshold 0.2: ">" and ">=" differ there
    thresholds = threshold_levels(19)
    levels = thinned_levels(values, thresholds, strict=strict)
    for t, level in zip(thresholds, levels, strict=True):
        counted = values > t if strict else values >= t
        assert np.array_equal(np.sort(level), np.flatnonzero(thin(counted)))


def _load_pyedgeeval_thin():  # noqa: ANN202 - a function of the optional package
    """pyEdgeEval's pure-numpy bwmorph port, loaded by path (its package __init__ imports OpenCV)."""
    root = Path(importlib.util.find_spec("pyEdgeEval").submodule_search_locations[0])
    spec = importlib.util.spec_from_file_location("_bwmorph_thin", root / "preprocess/thin/bwmorph_thin.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.bwmorph_thin


@needs_bsds
def test_thin_matches_pyedgeeval_bwmorph_port(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(np, "in1d", np.isin, raising=False)  # the port calls np.in1d, gone in NumPy 2.4
    reference = _load_pyedgeeval_thin()
    rng = np.random.default_rng(0)
    for _ in range(3):
        mask = ndimage.binary_dilation(rng.random((40, 50)) < 0.03, iterations=2) | (rng.random((40, 50)) < 0.05)
        assert np.array_equal(thin(mask), reference(mask))


@needs_bsds
def test_nms_matches_the_compiled_kernel() -> None:
    from pyEdgeEval._lib import nms

    soft, _ = _scene(1)
    smooth = conv_tri(soft, 1)
    angle = orientation(smooth)
    expected = nms(smooth.astype(np.float64), angle.astype(np.float64), r=1, s=5, m=1.01)
    np.testing.assert_allclose(edge_nms(smooth), expected, atol=1e-6)
    assert "cv2" not in sys.modules


def test_smoothing_and_orientation_follow_their_definitions() -> None:
    rng = np.random.default_rng(4)
    image = ndimage.gaussian_filter(rng.random((30, 41)), 2).astype(np.float32)
    for radius in (1, 4):
        kernel = np.concatenate([np.arange(1, radius + 2), np.arange(radius, 0, -1)]) / (radius + 1) ** 2
        padded = np.pad(image.astype(np.float64), radius, mode="symmetric")
        rows = sum(k * padded[i : i + image.shape[0]] for i, k in enumerate(kernel))
        both = sum(k * rows[:, i : i + image.shape[1]] for i, k in enumerate(kernel))
        np.testing.assert_allclose(conv_tri(image, radius), both, rtol=1e-6, atol=1e-7)
    smooth = conv_tri(image, 4).astype(np.float64)
    oy, ox = np.gradient(smooth)
    oyy, oxy = np.gradient(oy)
    expected = np.mod(np.arctan(oyy * np.sign(-oxy) / (np.gradient(ox, axis=1) + 1e-5)), np.pi)
    error = np.abs(orientation(image) - expected)
    assert np.minimum(error, np.pi - error).max() < 1e-3  # the same angle up to single-precision rounding


def test_incremental_equals_separate_matchings_on_non_nested_sets() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        height, width = rng.integers(5, 40, size=2)
        gt = rng.random((height, width)) < rng.uniform(0.02, 0.3)
        gt[height // 2, 2:-2] = True
        # sets that grow, shrink and jump around, so pixels both join and leave between sets
        sets = [np.flatnonzero(rng.random(gt.shape) < p) for p in rng.uniform(0.01, 0.5, size=rng.integers(1, 15))]
        radius = rng.uniform(0, 4)
        assert exact_counts(sets, gt, radius).tolist() == [_reference_matching(s, gt, radius) for s in sets]


@pytest.mark.parametrize("protocol", sorted(EDGE_PROTOCOLS))
def test_incremental_equals_separate_matchings_on_thinned_thresholds(protocol: str) -> None:
    soft, gt = _scene(2)
    chosen = EDGE_PROTOCOLS[protocol]
    levels = thinned_levels(chosen.values(soft), np.array(chosen.thresholds), chosen.strict)
    radius = 0.011 * np.hypot(*gt.shape)
    assert any(np.setdiff1d(a, b).size for a, b in zip(levels, levels[1:], strict=False))  # not nested
    assert exact_counts(levels, gt, radius).tolist() == [_reference_matching(level, gt, radius) for level in levels]


def test_missing_kernel_says_how_to_build_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "densemtl.metrics._boundary_core", None)
    with pytest.raises(UserError, match=r"pip install -e \."):
        core()


def test_kernels_reject_bad_arguments() -> None:
    with pytest.raises(ValueError, match="increasing"):
        core().match_levels(np.zeros(1, np.int64), np.array([0, 1]), np.array([3, 2]), 2, 2, 1.0)
    with pytest.raises(ValueError, match="outside"):
        core().thin_levels(np.array([7], np.int64), np.array([1]), 2, 2)
    with pytest.raises(TypeError, match="contiguous array"):
        core().thin_levels(np.array([0.5]), np.array([1]), 2, 2)


def _line_maps(offset: int) -> tuple[np.ndarray, np.ndarray]:
    gt = np.zeros((40, 60), dtype=np.float32)
    gt[8:32, 20] = 1
    pred = np.zeros_like(gt)
    pred[8:32, 20 + offset] = 1
    return pred, gt


@pytest.mark.parametrize(("offset", "max_dist", "expected"), [(0, 0.0075, 100.0), (1, 0.03, 100.0), (1, 0.0075, 0.0)])
def test_line_within_and_outside_tolerance(offset: int, max_dist: float, expected: float) -> None:
    # radius = max_dist x diagonal (72.1 px): 2.2 px for 0.03 (one pixel off matches), 0.54 px for 0.0075
    pred, gt = _line_maps(offset)
    metric = BoundaryMetric(max_dist=max_dist)
    metric.update(pred[None, None], gt[None, None])
    result = metric.compute()
    assert result["odsF"] == pytest.approx(expected)
    assert result["oisF"] == pytest.approx(expected)


def test_all_zero_prediction_scores_zero() -> None:
    _, gt = _line_maps(0)
    metric = BoundaryMetric(max_dist=0.011)
    metric.update(np.zeros((1, 1, *gt.shape), dtype=np.float32), gt[None, None])
    assert metric.compute() == {"odsF": 0.0, "oisF": 0.0, "AP": 0.0}


def test_ignored_pixels_count_nowhere() -> None:
    pred, gt = _line_maps(0)
    pred[8:32, 45] = 1  # a second predicted line ...
    gt[:, 40:] = 255  # ... inside the ignored region, where a ground-truth boundary is hidden too
    gt[8:32, 50] = 255
    metric = BoundaryMetric(max_dist=0.0075)
    metric.update(pred[None, None], gt[None, None])
    assert metric.compute()["odsF"] == pytest.approx(100.0)


def test_ods_ois_ap_from_counts() -> None:
    metric = BoundaryMetric(max_dist=0.011, thresholds=3)
    # two images, three thresholds: (cntR, sumR, cntP, sumP)
    first = np.array([[8, 10, 8, 20], [6, 10, 6, 8], [2, 10, 2, 2]])
    second = np.array([[4, 4, 4, 16], [3, 4, 3, 4], [0, 4, 0, 0]])
    metric.counts["per_threshold"] += first + second
    metric.counts["ois"] += first[1] + second[1]  # both images are best at the middle threshold
    result = metric.compute()
    f_mid = 2 * (9 / 12) * (9 / 14) / (9 / 12 + 9 / 14)
    assert result["odsF"] == pytest.approx(100 * f_mid)
    assert result["oisF"] == pytest.approx(100 * f_mid)
    recall = np.array([12 / 14, 9 / 14, 2 / 14])
    precision = np.array([12 / 36, 9 / 12, 2 / 2])
    grid = np.arange(101) / 100
    inside = grid[(grid >= recall.min()) & (grid <= recall.max())]
    expected_ap = np.interp(inside, recall[::-1], precision[::-1]).sum() / 100
    assert result["AP"] == pytest.approx(100 * expected_ap)
    assert average_precision(np.array([1.0]), np.array([0.5])) == 0.0


def test_missing_bsds_package_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pyEdgeEval", None)
    monkeypatch.setitem(sys.modules, "pyEdgeEval._lib", None)
    with pytest.raises(UserError, match=r"pip install 'densemtl\[bsds\]'"):
        bsds_kernel()
    with pytest.raises(UserError, match="pyEdgeEval"):
        BoundaryMetric(max_dist=0.011, matcher="bsds")


@needs_bsds
def test_bsds_and_exact_agree_on_easy_maps() -> None:
    # The BSDS kernel samples its sparse graph with a time-seeded generator: now and then it misses one
    # match even on identical maps, so "agree" means same totals and at most a pixel fewer matched.
    thresholds = threshold_levels(9)
    for offset, max_dist in ((0, 0.0075), (1, 0.03)):
        pred, gt = _line_maps(offset)
        exact = image_counts(pred, gt, max_dist, thresholds, "exact")
        bsds = image_counts(pred, gt, max_dist, thresholds, "bsds")
        assert np.array_equal(exact[:, [1, 3]], bsds[:, [1, 3]])  # same ground truth and thinned prediction
        matched_gap = exact[:, [0, 2]] - bsds[:, [0, 2]]
        assert matched_gap.min() >= 0 and matched_gap.max() <= 1
        assert exact[:, 0].max() == exact[:, 1].max()  # the exact matcher finds every pixel


@needs_bsds
def test_bsds_and_exact_agree_within_half_a_point_on_realistic_maps() -> None:
    scores = {}
    for matcher in ("exact", "bsds"):
        metric = BoundaryMetric(max_dist=0.011, thresholds=19, matcher=matcher)
        for seed in range(3):
            soft, gt = _scene(seed)
            metric.update(soft[None, None], gt[None, None].astype(np.float32))
        scores[matcher] = metric.compute()
    for key in ("odsF", "oisF", "AP"):
        assert scores["exact"][key] == pytest.approx(scores["bsds"][key], abs=0.5), key
    assert scores["exact"]["odsF"] >= scores["bsds"]["odsF"] - 1e-9  # a maximum matching never matches fewer
