"""Matching predicted to ground-truth boundary pixels at every threshold of one image.

Two matchers share one interface, :func:`match_counts` (matched predicted pixels and matched
ground-truth pixels at each threshold):

``exact``
    A maximum-cardinality one-to-one matching on the bipartite graph whose edges join a predicted and a
    ground-truth pixel at most ``max_dist x diagonal`` apart. The maximum size does not depend on the
    order of the pixels. All thresholds are answered by one incremental matching: thresholds are visited
    from the highest down, the predicted pixels that appear are added (each followed by one augmenting
    path search, which keeps the matching maximum) and the few that disappear (thinning is not
    monotone) are removed (followed by one search from the freed ground-truth pixel). Ground-truth
    pixels proved unreachable by a failed search stay marked "dead" until the next removal, so failed
    searches cost O(edges) in total. The result equals a separate maximum matching per threshold.

``bsds``
    The original BSDS assignment (``correspondPixels``, a sparse min-cost assignment with outliers) from
    the optional ``pyEdgeEval`` package, called once per threshold: numbers comparable with tables
    computed by SEISM / the BSDS benchmark, at a few seconds per threshold.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from densemtl.errors import UserError

MATCHERS = ("exact", "bsds")


def disk_offsets(radius: float) -> np.ndarray:
    """``(dy, dx)`` pairs with dy^2 + dx^2 <= radius^2, nearest first (the tolerance disk)."""
    reach = int(np.floor(radius))
    dy, dx = np.mgrid[-reach : reach + 1, -reach : reach + 1]
    dy, dx = dy.ravel(), dx.ravel()
    keep = dy * dy + dx * dx <= radius * radius
    dy, dx = dy[keep], dx[keep]
    order = np.argsort(dy * dy + dx * dx, kind="stable")
    return np.stack([dy[order], dx[order]], axis=1)


def tolerance_graph(
    pred_pixels: np.ndarray, gt: np.ndarray, radius: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CSR adjacency from predicted pixels (flat indices) to the ground-truth pixels within ``radius``.

    Returns ``(indptr, indices, gt_pixels)``: the neighbours of predicted pixel i are
    ``indices[indptr[i]:indptr[i + 1]]``, numbers into ``gt_pixels`` (flat indices of ``gt``).
    """
    height, width = gt.shape
    gt_pixels = np.flatnonzero(gt)
    reach = int(np.floor(radius))
    inner = np.full(height * width, -1, dtype=np.int64)
    inner[gt_pixels] = np.arange(gt_pixels.size)
    lookup = np.full((height + 2 * reach, width + 2 * reach), -1, dtype=np.int64)
    lookup[reach : reach + height, reach : reach + width] = inner.reshape(height, width)
    ys, xs = np.divmod(pred_pixels, width)
    rows, cols = [], []
    for dy, dx in disk_offsets(radius):
        neighbour = lookup[ys + reach + dy, xs + reach + dx]
        hit = np.flatnonzero(neighbour >= 0)
        rows.append(hit)
        cols.append(neighbour[hit])
    rows_all = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
    cols_all = np.concatenate(cols) if cols else np.zeros(0, dtype=np.int64)
    order = np.argsort(rows_all, kind="stable")  # per row: nearest neighbours first
    indptr = np.zeros(pred_pixels.size + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows_all, minlength=pred_pixels.size), out=indptr[1:])
    return indptr, cols_all[order], gt_pixels


class IncrementalMatching:
    """A maximum bipartite matching kept maximum while left vertices are switched on and off.

    Left = predicted pixels, right = ground-truth pixels. ``add(i)`` / ``remove(i)`` update the
    matching with at most one augmenting-path search; ``size`` is always the maximum matching size of
    the graph restricted to the active left vertices.
    """

    def __init__(self, indptr: np.ndarray, indices: np.ndarray, num_right: int) -> None:
        num_left = indptr.size - 1
        self.left_ptr = indptr.tolist()
        self.left_adj = indices.tolist()
        order = np.argsort(indices, kind="stable")
        right_ptr = np.zeros(num_right + 1, dtype=np.int64)
        np.cumsum(np.bincount(indices, minlength=num_right), out=right_ptr[1:])
        self.right_ptr = right_ptr.tolist()
        self.right_adj = np.repeat(np.arange(num_left), np.diff(indptr))[order].tolist()
        self.mate_left = [-1] * num_left
        self.mate_right = [-1] * num_right
        self.active = [False] * num_left
        self.dead = [False] * num_right
        self.seen_left = [0] * num_left
        self.seen_right = [0] * num_right
        self.stamp = 0
        self.size = 0

    def add(self, left: int) -> None:
        self.active[left] = True
        if self.left_ptr[left] != self.left_ptr[left + 1] and self._augment_from_left(left):
            self.size += 1

    def remove(self, left: int) -> None:
        """Switch ``left`` off; if its partner can be re-matched through dead vertices, do so.

        Invariant: every alternating path from a free active left vertex stays among dead right
        vertices (all matched, closed under right -> partner -> neighbours). So an augmenting path,
        which must end at the freed partner, exists only if the partner is dead, and it runs through
        dead right vertices only; flipping it keeps the invariant. When there is none, the dead
        vertices that reach the freed partner (those the failed search visited) stop being dead.
        """
        self.active[left] = False
        right = self.mate_left[left]
        if right < 0:
            return
        self.mate_left[left] = -1
        self.mate_right[right] = -1
        self.size -= 1
        if self.dead[right] and self._augment_from_right(right):
            self.size += 1

    def _augment_from_left(self, start: int) -> bool:
        """Depth-first search for an augmenting path from a free left vertex; flips it if found."""
        ptr, adj, mate_left, mate_right = self.left_ptr, self.left_adj, self.mate_left, self.mate_right
        dead, seen = self.dead, self.seen_right
        self.stamp += 1
        stamp = self.stamp
        path_left, path_right, positions, visited = [start], [], [ptr[start]], []
        while path_left:
            left = path_left[-1]
            lo, hi = positions[-1], ptr[left + 1]
            if lo == ptr[left]:  # first visit: take a free neighbour if there is one
                for right in adj[lo:hi]:
                    if mate_right[right] < 0:
                        path_right.append(right)
                        for a, b in zip(path_left, path_right, strict=True):
                            mate_left[a] = b
                            mate_right[b] = a
                        return True
            descended = False
            for position in range(lo, hi):
                right = adj[position]
                if dead[right] or seen[right] == stamp:
                    continue
                seen[right] = stamp
                visited.append(right)
                positions[-1] = position + 1
                path_right.append(right)
                path_left.append(mate_right[right])
                positions.append(ptr[mate_right[right]])
                descended = True
                break
            if not descended:
                path_left.pop()
                positions.pop()
                if path_right:
                    path_right.pop()
        for right in visited:
            dead[right] = True
        return False

    def _augment_from_right(self, start: int) -> bool:
        """Search from a freed right vertex to a free active left vertex through dead right vertices."""
        ptr, adj, mate_left, mate_right = self.right_ptr, self.right_adj, self.mate_left, self.mate_right
        active, dead, seen = self.active, self.dead, self.seen_left
        self.stamp += 1
        stamp = self.stamp
        path_right, path_left, positions, visited = [start], [], [ptr[start]], [start]
        while path_right:
            right = path_right[-1]
            lo, hi = positions[-1], ptr[right + 1]
            if lo == ptr[right]:
                for left in adj[lo:hi]:
                    if active[left] and mate_left[left] < 0:
                        path_left.append(left)
                        for b, a in zip(path_right, path_left, strict=True):
                            mate_right[b] = a
                            mate_left[a] = b
                        return True
            descended = False
            for position in range(lo, hi):
                left = adj[position]
                if not active[left] or seen[left] == stamp or not dead[mate_left[left]]:
                    continue
                seen[left] = stamp
                positions[-1] = position + 1
                path_left.append(left)
                path_right.append(mate_left[left])
                visited.append(mate_left[left])
                positions.append(ptr[mate_left[left]])
                descended = True
                break
            if not descended:
                path_right.pop()
                positions.pop()
                if path_left:
                    path_left.pop()
        for right in visited:
            dead[right] = False
        return False


def exact_counts(pred_sets: Sequence[np.ndarray], gt: np.ndarray, radius: float) -> np.ndarray:
    """Maximum matching size for each predicted pixel set (flat indices) against the boundary mask ``gt``.

    ``pred_sets`` are visited in reverse order (they are meant to be thresholds in increasing order, so
    the sets mostly shrink along the list); any sets are allowed.
    """
    sizes = np.zeros(len(pred_sets), dtype=np.int64)
    if not gt.any() or not any(s.size for s in pred_sets):
        return sizes
    union = np.unique(np.concatenate(list(pred_sets)))
    indptr, indices, gt_pixels = tolerance_graph(union, gt, radius)
    matching = IncrementalMatching(indptr, indices, gt_pixels.size)
    present = np.zeros(union.size, dtype=bool)
    for k in range(len(pred_sets) - 1, -1, -1):
        now = np.zeros(union.size, dtype=bool)
        now[np.searchsorted(union, pred_sets[k])] = True
        for left in np.flatnonzero(present & ~now).tolist():
            matching.remove(left)
        for left in np.flatnonzero(now & ~present).tolist():
            matching.add(left)
        present = now
        sizes[k] = matching.size
    return sizes


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
