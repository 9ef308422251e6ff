"""Matching predicted to ground-truth boundary pixels at every threshold of one image.

Two matchers, called by :func:`densemtl.metrics.boundary.image_counts` with the predicted pixel set of
every threshold:

``exact`` (:func:`exact_counts`)
    A maximum-cardinality one-to-one matching on the bipartite graph whose edges join a predicted and a
    ground-truth pixel at most ``max_dist x diagonal`` apart. Its size does not depend on the order of
    the pixels. All thresholds are answered by one matching carried from set to set in the compiled
    kernel (``match_levels`` in ``_boundary_core.c``), thresholds visited from the highest down: pixels
    that leave are unmatched, pixels that join get a breadth-first search for an augmenting path.
    Ground-truth pixels reached by a failed search are marked "dead" and skipped by later searches.
    Why the result is a maximum matching for every set: between searches, every alternating path from an
    already searched free predicted pixel stays among dead pixels, which are all matched and closed under
    "partner, then its neighbours" (a failed search adds exactly such a closed set, and flipping an
    augmenting path, which never enters it, leaves it closed). A pixel that leaves can only shrink these
    reaches. If its partner was not dead, no free predicted pixel reaches the freed partner, so the
    invariant holds and only the joining pixels need a search; if the partner was dead, the dead marks
    are cleared and every free predicted pixel of the set is searched again. After the searches no free
    predicted pixel has an augmenting path, so the matching is maximum (Berge). Tests compare every
    threshold with scipy's Hopcroft-Karp.

``bsds`` (:func:`bsds_counts`)
    The original BSDS assignment (``correspondPixels``, a sparse min-cost assignment with outliers) from
    the optional ``pyEdgeEval`` package, called once per threshold: numbers comparable with tables
    computed by SEISM / the BSDS benchmark, at seconds per threshold.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from densemtl.errors import UserError
from densemtl.metrics.edge_nms import core

MATCHERS = ("exact", "bsds")


def exact_counts(pred_sets: Sequence[np.ndarray], gt: np.ndarray, radius: float) -> np.ndarray:
    """Maximum matching size for each predicted pixel set (flat indices) against the boundary mask ``gt``.

    ``pred_sets`` are visited in reverse order (they are meant to be thresholds in increasing order, so
    the sets mostly grow along the visit); any sets are allowed.
    """
    if not len(pred_sets):
        return np.zeros(0, dtype=np.int64)
    pixels = np.concatenate([np.asarray(s, dtype=np.int64).ravel() for s in pred_sets])
    offsets = np.zeros(len(pred_sets) + 1, dtype=np.int64)
    np.cumsum([np.size(s) for s in pred_sets], out=offsets[1:])
    gt_pixels = np.flatnonzero(gt).astype(np.int64)
    height, width = gt.shape
    sizes = core().match_levels(pixels, offsets, gt_pixels, height, width, float(radius))
    return np.asarray(sizes, dtype=np.int64)


def bsds_kernel() -> Callable[..., tuple]:
    """``pyEdgeEval``'s BSDS ``correspond_pixels``, or a UserError naming the extra to install."""
    try:
        from pyEdgeEval._lib import correspond_pixels
    except ImportError:
        raise UserError(
            "the 'bsds' boundary matcher needs the optional package pyEdgeEval: "
            "pip install 'densemtl[bsds]' (it builds from source with Cython and a C++ compiler)"
        ) from None
    return correspond_pixels


def bsds_counts(
    pred_sets: Sequence[np.ndarray], gt: np.ndarray, max_dist: float
) -> tuple[np.ndarray, np.ndarray]:
    """(matched predicted, matched ground-truth) pixels per predicted set (flat indices), BSDS assignment."""
    correspond_pixels = bsds_kernel()
    matched_pred = np.zeros(len(pred_sets), dtype=np.int64)
    matched_gt = np.zeros(len(pred_sets), dtype=np.int64)
    gt_map = gt.astype(np.float64)
    for k, pixels in enumerate(pred_sets):
        if not pixels.size or not gt.any():
            continue
        mask = np.zeros(gt.size, dtype=np.float64)
        mask[pixels] = 1
        match_pred, match_gt, _, _ = correspond_pixels(mask.reshape(gt.shape), gt_map, max_dist=max_dist)
        matched_pred[k] = np.count_nonzero(match_pred > 0)
        matched_gt[k] = np.count_nonzero(match_gt > 0)
    return matched_pred, matched_gt
