"""Matching predicted to ground-truth boundary pixels at every threshold of one image.

Two matchers, called by :func:`densemtl.metrics.boundary.image_counts` with the predicted pixel set of
every threshold:

``exact`` (:func:`exact_counts`)
    A maximum-cardinality one-to-one matching on the bipartite graph whose edges join a predicted and a
    ground-truth pixel at most ``max_dist x diagonal`` apart. Its size does not depend on the order of
    the pixels. All thresholds are answered by one incremental matching: thresholds are visited from
    the highest down; predicted pixels that appear are added (a direct match to a free neighbour, else
    one augmenting-path search: either keeps the matching maximum) and the few that disappear
    (thinning is not monotone) are removed (then at most one search from the freed ground-truth pixel).
    Ground-truth pixels proved unreachable by a failed search are marked "dead" and never searched
    again while they stay so, which bounds the cost of failed searches. The result equals a separate
    maximum matching per threshold (tests compare with scipy's Hopcroft-Karp).

``bsds`` (:func:`bsds_counts`)
    The original BSDS assignment (``correspondPixels``, a sparse min-cost assignment with outliers) from
    the optional ``pyEdgeEval`` package, called once per threshold: numbers comparable with tables
    computed by SEISM / the BSDS benchmark, at seconds per threshold.
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
    flat_lookup = lookup.ravel()
    base = (ys + reach) * lookup.shape[1] + xs + reach
    blocks = []  # per offset, nearest first: (predicted pixels with a neighbour there, the neighbour)
    degree = np.zeros(pred_pixels.size, dtype=np.int64)
    for dy, dx in disk_offsets(radius):
        neighbour = flat_lookup[base + dy * lookup.shape[1] + dx]
        hit = np.flatnonzero(neighbour >= 0)
        blocks.append((hit, neighbour[hit]))
        degree[hit] += 1
    indptr = np.zeros(pred_pixels.size + 1, dtype=np.int64)
    np.cumsum(degree, out=indptr[1:])
    indices = np.empty(indptr[-1], dtype=np.int64)
    fill = indptr[:-1].copy()
    for hit, neighbour in blocks:  # a pixel appears at most once per block: no write conflicts
        indices[fill[hit]] = neighbour
        fill[hit] += 1
    return indptr, indices, gt_pixels


class IncrementalMatching:
    """A maximum bipartite matching kept maximum while left vertices are switched on and off.

    Left = predicted pixels, right = ground-truth pixels. ``add(lefts)`` / ``remove(left)`` update the
    matching with at most one augmenting-path search per vertex; ``size`` is always the maximum
    matching size of the graph restricted to the active left vertices.
    """

    def __init__(self, indptr: np.ndarray, indices: np.ndarray, num_right: int) -> None:
        num_left = indptr.size - 1
        self.left_ptr = indptr.tolist()
        self.left_adj = indices.tolist()
        self.right_ptr: list[int] = []  # the transpose, built on the first removal that needs it
        self.right_adj: list[int] = []
        self.mate_left = [-1] * num_left
        self.mate_right = [-1] * num_right
        self.active = [False] * num_left
        self.dead = [False] * num_right
        self.seen_left = [0] * num_left
        self.seen_right = [0] * num_right
        self.stamp = 0
        self.size = 0
        self.indptr = indptr
        self.indices = indices
        self.free_right = np.ones(num_right, dtype=bool)  # numpy mirror of mate_right < 0

    def _direct_matches(self, lefts: np.ndarray) -> np.ndarray:
        """Match ``lefts`` to free neighbours in a few vectorised rounds; returns those still unmatched.

        Each direct match is an augmenting path of length one, so the matching stays maximum.
        """
        for _ in range(3):
            starts = self.indptr[lefts]
            counts = self.indptr[lefts + 1] - starts
            owner = np.repeat(np.arange(lefts.size), counts)
            edges = np.arange(owner.size) - np.repeat(np.cumsum(counts) - counts - starts, counts)
            rights = self.indices[edges]
            hits = np.flatnonzero(self.free_right[rights])
            if not hits.size:
                break
            first = hits[np.concatenate([[True], owner[hits[1:]] != owner[hits[:-1]]])]  # first free per left
            order = np.argsort(rights[first], kind="stable")
            chosen = first[order]
            keep = chosen[np.concatenate([[True], rights[chosen[1:]] != rights[chosen[:-1]]])]  # one per right
            won_left, won_right = lefts[owner[keep]], rights[keep]
            self.free_right[won_right] = False
            for a, b in zip(won_left.tolist(), won_right.tolist(), strict=True):
                self.mate_left[a] = b
                self.mate_right[b] = a
            self.size += keep.size
            matched = np.zeros(lefts.size, dtype=bool)
            matched[owner[keep]] = True
            lefts = lefts[~matched]
            if not lefts.size:
                break
        return lefts

    def add(self, lefts: np.ndarray) -> None:
        """Switch on ``lefts``: direct matches first, then one augmenting-path search per leftover."""
        for left in lefts.tolist():
            self.active[left] = True
        lefts = lefts[self.indptr[lefts + 1] > self.indptr[lefts]]
        if lefts.size:
            lefts = self._direct_matches(lefts)
        for left in lefts.tolist():
            if self._augment_from_left(left):
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
        self.free_right[right] = True
        self.size -= 1
        if self.dead[right] and self._augment_from_right(right):
            self.free_right[right] = False
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
                        self.free_right[right] = False
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

    def _build_transpose(self) -> None:
        order = np.argsort(self.indices, kind="stable")
        right_ptr = np.zeros(self.free_right.size + 1, dtype=np.int64)
        np.cumsum(np.bincount(self.indices, minlength=self.free_right.size), out=right_ptr[1:])
        self.right_ptr = right_ptr.tolist()
        self.right_adj = np.repeat(np.arange(self.indptr.size - 1), np.diff(self.indptr))[order].tolist()

    def _augment_from_right(self, start: int) -> bool:
        """Search from a freed right vertex to a free active left vertex through dead right vertices."""
        if not self.right_ptr:
            self._build_transpose()
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
    in_union = np.zeros(gt.size, dtype=bool)
    for pixels in pred_sets:
        in_union[pixels] = True
    union = np.flatnonzero(in_union)
    indptr, indices, gt_pixels = tolerance_graph(union, gt, radius)
    matching = IncrementalMatching(indptr, indices, gt_pixels.size)
    present = np.zeros(union.size, dtype=bool)
    for k in range(len(pred_sets) - 1, -1, -1):
        now = np.zeros(union.size, dtype=bool)
        now[np.searchsorted(union, pred_sets[k])] = True
        for left in np.flatnonzero(present & ~now).tolist():
            matching.remove(left)
        matching.add(np.flatnonzero(now & ~present))
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
