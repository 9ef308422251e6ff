"""Boundary-map processing of the field's evaluation: triangle smoothing, edge NMS and thinning.

The structured-edges toolbox's steps, as the HED and SEISM pipelines call them: :func:`conv_tri` (the
triangle filter ``convTri``), the orientation from second derivatives of a radius-4 triangle smoothing,
:func:`edge_nms` (``edgesNmsMex``: suppression along the normal with radius 1 and multiplier 1.01, then
the linear attenuation of a 5-pixel border band) and :func:`thin` (MATLAB ``bwmorph(mask, 'thin', Inf)``,
the two-sub-iteration algorithm of Lam, Lee and Suen 1992). All of it runs in
the compiled kernel ``densemtl.metrics._boundary_core`` (built by ``pip install -e .``), in single
precision as the MEX files do (the smoothing accumulates in double).
"""

from __future__ import annotations

import importlib
from types import ModuleType

import numpy as np

from densemtl.errors import UserError


def core() -> ModuleType:
    """The compiled kernel module, or a UserError saying how to build it."""
    try:
        return importlib.import_module("densemtl.metrics._boundary_core")
    except ImportError:
        raise UserError(
            "densemtl's compiled boundary kernel (densemtl/metrics/_boundary_core.c) is not built: "
            "install the checkout with `pip install -e .` (needs a C compiler)"
        ) from None


def _float_map(image: np.ndarray) -> tuple[np.ndarray, np.ndarray, int, int]:
    """(contiguous float32 copy or view of the H x W map, an output of its shape, H, W)."""
    image = np.ascontiguousarray(image, dtype=np.float32)
    if image.ndim != 2:
        raise ValueError(f"expected an H x W map, got shape {image.shape}")
    return image, np.empty_like(image), *image.shape


def conv_tri(image: np.ndarray, radius: int) -> np.ndarray:
    """``convTri``: separable triangle filter ``[1 .. r+1 .. 1] / (r+1)^2``, symmetric padding (float32)."""
    if radius < 1:
        return np.asarray(image, dtype=np.float32)
    image, out, height, width = _float_map(image)
    core().conv_tri(image, out, height, width, radius)
    return out


def orientation(edges: np.ndarray) -> np.ndarray:
    """Edge orientation in [0, pi): ``mod(atan(Oyy sign(-Oxy) / (Oxx + 1e-5)), pi)`` from the second
    derivatives (numpy.gradient) of ``convTri(edges, 4)``; 0 where undefined (float32)."""
    edges, out, height, width = _float_map(edges)
    core().orientation(edges, out, height, width, 4)
    return out


def edge_nms(edges: np.ndarray, radius: int = 1, border: int = 5, multiplier: float = 1.01) -> np.ndarray:
    """``edgesNmsMex(E, O, radius, border, multiplier)`` of an H x W map with its own orientation (float32).

    A pixel is kept when ``multiplier`` times its value is not below the bilinear samples at distances
    1..radius along the normal on both sides; then the ``border`` outermost rows and columns are scaled
    by ``i / border`` (i = distance to the image edge).
    """
    edges, out, height, width = _float_map(edges)
    core().nms(edges, orientation(edges), out, height, width, radius, border, float(multiplier))
    return out


def thinned_levels(values: np.ndarray, thresholds: np.ndarray, strict: bool = False) -> list[np.ndarray]:
    """``thin(values >= t)`` (``values > t`` when ``strict``) for every threshold, as sorted flat indices.

    Thresholds must be positive (a zero value never counts). The pixels counted at a threshold are a
    prefix of the positive pixels sorted by decreasing value, so one sort serves every threshold.
    """
    height, width = values.shape
    flat = values.ravel()
    order = np.flatnonzero(flat > 0)
    order = order[np.argsort(-flat[order], kind="stable")]
    ends = np.searchsorted(-flat[order], -np.asarray(thresholds, dtype=np.float64), side="left" if strict else "right")
    pixels, offsets = core().thin_levels(order.astype(np.int64), ends.astype(np.int64), height, width)
    return np.split(np.asarray(pixels, dtype=np.int64), np.asarray(offsets, dtype=np.int64)[1:-1])


def thin(mask: np.ndarray) -> np.ndarray:
    """Morphological thinning to 8-connected one-pixel curves (MATLAB ``bwmorph(mask, 'thin', Inf)``)."""
    mask = np.asarray(mask, dtype=bool)
    (pixels,) = thinned_levels(mask.astype(np.float64), np.array([0.5]))
    out = np.zeros(mask.shape, dtype=bool)
    out.ravel()[pixels] = True
    return out
