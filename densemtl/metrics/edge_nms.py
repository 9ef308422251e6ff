"""The boundary-map processing of the field's evaluation, in numpy: edge NMS and morphological thinning.

The multi-task papers score boundaries with SEISM after the NMS step of the HED/structured-edges code
(``nms_process``): triangle smoothing (radius 1), orientation from the second derivatives of a radius-4
triangle smoothing, non-maximum suppression along that orientation (radius 1, multiplier 1.01) with
the 5-pixel border attenuation, and the result written as an 8-bit PNG. SEISM then thresholds that
map and thins each binary map (MATLAB ``bwmorph(..., 'thin', Inf)``). :func:`edge_nms` and
:func:`thin` reproduce those steps; :func:`quantize` reproduces the 8-bit round trip.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def conv_tri(image: np.ndarray, radius: int) -> np.ndarray:
    """Separable triangle filter ``[1 .. r+1 .. 1] / (r+1)^2``, mirror padding (edge pixel repeated)."""
    if radius < 1:
        return image
    kernel = np.concatenate([np.arange(1, radius + 2), np.arange(radius, 0, -1)]).astype(np.float32)
    kernel /= (radius + 1) ** 2
    out = ndimage.convolve1d(image, kernel, axis=0, mode="reflect")
    return ndimage.convolve1d(out, kernel, axis=1, mode="reflect")


def _orientation(edges: np.ndarray) -> np.ndarray:
    """Edge orientation in [0, pi) from second derivatives of the smoothed map."""
    smooth = conv_tri(edges, 4)
    oy, ox = np.gradient(smooth)
    oxx = np.gradient(ox, axis=1)
    oyy, oxy = np.gradient(oy)
    with np.errstate(divide="ignore", invalid="ignore"):
        orientation = np.mod(np.arctan(oyy * np.sign(-oxy) / (oxx + 1e-5)), np.pi)
    return np.nan_to_num(orientation, nan=0.0).astype(np.float32)  # 0/0: undefined, take horizontal


def _bilinear(image: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Bilinear samples at (x, y), coordinates clamped to the image as the NMS kernel does."""
    height, width = image.shape
    x = np.clip(x, 0, width - 1.001)
    y = np.clip(y, 0, height - 1.001)
    x0, y0 = x.astype(np.int64), y.astype(np.int64)
    dx, dy = x - x0, y - y0
    return (
        image[y0, x0] * (1 - dx) * (1 - dy)
        + image[y0, x0 + 1] * dx * (1 - dy)
        + image[y0 + 1, x0] * (1 - dx) * dy
        + image[y0 + 1, x0 + 1] * dx * dy
    )


def edge_nms(
    prob: np.ndarray, radius: int = 1, border: int = 5, multiplier: float = 1.01, min_value: float = 0.0
) -> np.ndarray:
    """Thin a soft boundary map (H x W in [0, 1]) to its ridges; returns float32 of the same shape.

    Pixels of the smoothed map below ``min_value`` are set to 0 without testing them (a speed-up for
    callers that quantise the result: below half a grey level they would round to 0 anyway).
    """
    edges = conv_tri(np.asarray(prob, dtype=np.float32), 1)
    orientation = _orientation(edges)
    out = np.where(edges >= min_value, edges, np.float32(0))
    ys, xs = np.nonzero(out)
    if ys.size:
        value = edges[ys, xs] * multiplier
        cos, sin = np.cos(orientation[ys, xs]), np.sin(orientation[ys, xs])
        suppressed = np.zeros(ys.size, dtype=bool)
        for step in range(-radius, radius + 1):
            if step:
                suppressed |= value < _bilinear(edges, xs + step * cos, ys + step * sin)
        out[ys[suppressed], xs[suppressed]] = 0
    height, width = out.shape
    border = min(border, width // 2, height // 2)
    for i in range(border):
        scale = i / border
        out[:, i] *= scale
        out[:, width - 1 - i] *= scale
    for i in range(border):
        scale = i / border
        out[i, :] *= scale
        out[height - 1 - i, :] *= scale
    return out


def quantize(prob: np.ndarray) -> np.ndarray:
    """The value an 8-bit PNG keeps (``round(255 p) / 255``), as the field stores NMS output."""
    return np.round(np.clip(prob, 0, 1).astype(np.float64) * 255) / 255


# Neighbour order of the thinning conditions: x1 = east, then counter-clockwise (x2 = north-east, ...).
_NEIGHBOURS = ((0, 1), (-1, 1), (-1, 0), (-1, -1), (0, -1), (1, -1), (1, 0), (1, 1))


def _thin_tables() -> tuple[np.ndarray, np.ndarray]:
    """Deletion tables (indexed by the 8-bit neighbourhood code) of the two sub-iterations."""
    first = np.zeros(256, dtype=bool)
    second = np.zeros(256, dtype=bool)
    for code in range(256):
        x = [(code >> i) & 1 for i in range(8)] + [code & 1]  # x[0..7] = x1..x8, x[8] = x1
        crossings = sum(1 for k in range(4) if not x[2 * k] and (x[2 * k + 1] or x[2 * k + 2]))
        n1 = sum(x[2 * k] or x[2 * k + 1] for k in range(4))
        n2 = sum(x[2 * k + 1] or x[2 * k + 2] for k in range(4))
        if crossings != 1 or not 2 <= min(n1, n2) <= 3:
            continue
        first[code] = ((x[1] or x[2] or not x[7]) and x[0]) == 0
        second[code] = ((x[5] or x[6] or not x[3]) and x[4]) == 0
    return first, second


_THIN_FIRST, _THIN_SECOND = _thin_tables()


def _neighbour_offsets(stride: int) -> np.ndarray:
    return np.array([dy * stride + dx for dy, dx in _NEIGHBOURS])


def _codes(image: np.ndarray, pixels: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """The 8-bit neighbourhood code (bit i = neighbour x_{i+1} is foreground) of each pixel."""
    code = image[pixels + offsets[0]].copy()
    for bit in range(1, 8):
        code |= image[pixels + offsets[bit]] << np.uint8(bit)
    return code


def _thin_inplace(image: np.ndarray, pixels: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Thin the foreground ``pixels`` of the flat zero-bordered uint8 ``image``; returns the survivors.

    The first iteration examines every pixel; later sub-iterations only the foreground neighbours of
    pixels deleted since that sub-iteration last ran (the others' neighbourhoods did not change, so
    their verdict cannot either). Same result as re-examining everything until nothing changes.
    """
    empty = pixels[:0]
    pending = [pixels, pixels]  # per sub-iteration: pixels to examine
    while pending[0].size or pending[1].size:
        for which, table in enumerate((_THIN_FIRST, _THIN_SECOND)):
            candidates = pending[which]
            pending[which] = empty
            candidates = candidates[image[candidates] == 1]
            if not candidates.size:
                continue
            removed = candidates[table[_codes(image, candidates, offsets)]]
            if removed.size:
                image[removed] = 0
                near = (removed[:, None] + offsets[None, :]).ravel()
                near = near[image[near] == 1]
                pending = [_distinct(np.concatenate([pending[0], near])), _distinct(np.concatenate([pending[1], near]))]
    return pixels[image[pixels] == 1]


def _distinct(values: np.ndarray) -> np.ndarray:
    """Sorted distinct values (a plain sort: faster than np.unique on these small index arrays)."""
    values = np.sort(values)
    return values[np.concatenate([[True], values[1:] != values[:-1]])]


def thin(mask: np.ndarray) -> np.ndarray:
    """Morphological thinning to 8-connected one-pixel curves (MATLAB ``bwmorph(mask, 'thin', Inf)``).

    The two-sub-iteration algorithm of Lam, Lee and Suen (1992), on the foreground pixels only.
    """
    height, width = mask.shape
    padded = np.zeros((height + 2, width + 2), dtype=np.uint8)
    padded[1:-1, 1:-1] = mask
    flat = padded.ravel()
    _thin_inplace(flat, np.flatnonzero(flat), _neighbour_offsets(width + 2))
    return padded[1:-1, 1:-1].astype(bool)


def thinned_levels(edges: np.ndarray, thresholds: np.ndarray) -> list[np.ndarray]:
    """``thin(edges >= t)`` for every threshold, as sorted flat pixel indices of ``edges``.

    Works on the pixel lists only (no full-image pass per threshold): the pixels at or above a
    threshold are a prefix of the pixels sorted by value.
    """
    height, width = edges.shape
    stride = width + 2
    flat_values = edges.ravel()
    order = np.flatnonzero(flat_values > 0)
    order = order[np.argsort(-flat_values[order], kind="stable")]
    sorted_values = -flat_values[order]
    padded_index = (order // width + 1) * stride + order % width + 1
    image = np.zeros((height + 2) * stride, dtype=np.uint8)
    offsets = _neighbour_offsets(stride)
    levels = []
    for t in thresholds:
        pixels = padded_index[: np.searchsorted(sorted_values, -t, side="right")]
        image[pixels] = 1
        kept = _thin_inplace(image, pixels, offsets)
        image[kept] = 0
        rows, cols = np.divmod(kept, stride)
        levels.append(np.sort((rows - 1) * width + cols - 1))
    return levels
