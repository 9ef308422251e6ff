"""The boundary-evaluation protocols of the multi-task papers, and SEISM's ground truth.

Every published number goes through the MATLAB benchmark SEISM (``src/piotr_edges/edgesEvalImg.m``):
per threshold, the predicted pixels that count are thinned (``bwmorph(E, 'thin', Inf)``) and matched
one-to-one to the ground truth ``thin(seg2bmap(G))`` within ``maxDist x diagonal``. What differs between
codebases is how the network's soft map becomes the map SEISM thresholds, which pixels count at a
threshold, and the thresholds. Given a soft map ``p`` in [0, 1], :attr:`EdgeProtocol.values` returns the
float64 map each protocol compares with its thresholds:

``seism-hed`` (HED ``examples/eval/nms_process.m`` in s9xie/hed_release-deprecated, then SEISM reading the
PNG with ``>=`` as its ``src/io/read_one_cont_png.m`` did at commit c23229a and as
Multi-Task-Learning-PyTorch's ``evaluation/seism/read_one_png.m`` does)
    ``E = convTri(single(p), 1)``, orientation from ``convTri(E, 4)``, ``edgesNmsMex(E, O, 1, 5, 1.01)``,
    written as ``uint8(E * 255)`` (MATLAB: the single product, rounded half away from zero); the
    PNG is read back as ``v / 255`` and a pixel counts when ``>= t`` for t = 0.01, 0.02, .., 0.99.
``invpt`` (InvPT / TaskPrompter: ``utils/utils.py`` ``get_output`` and ``evaluation/evaluate_utils.py``
in prismformore/Multi-Task-Transformer save the PNG; prismformore/Boundary-Detection-Evaluation-Tools
runs SEISM's ``src/io/read_one_cont_png.m`` (jponttuset/seism, current) with ``parameters/HED.txt``)
    the PNG holds ``uint8(255 * p)`` truncated (numpy ``astype``); it is read with ``im2single``
    (``v / 255`` in single precision), ``edgesNmsMex`` runs on it directly (no ``convTri(., 1)``, no
    re-quantisation), and a pixel counts when its single-precision value is ``> t`` (compared exactly
    with the double t, as MATLAB compares a single with a double), for the 101 thresholds 0.001,
    0.01, .., 0.99, 0.999.
``mtlpt`` (Multi-Task-Learning-PyTorch: ``utils/utils.py`` ``get_output`` and
``evaluation/evaluate_utils.py`` save the PNG, ``evaluation/seism/read_one_png.m`` reads it,
``evaluation/eval_edge.py`` writes the thresholds)
    the PNG holds ``uint8(255 * p)`` truncated; no NMS; a pixel counts when ``v / 255 >= t`` (double),
    t = 0.01, .., 0.99.

Thresholds written as decimals in a parameter file are read by ``str2double``, i.e. the double
nearest the decimal, which is what ``k / 100`` computes. A value ``v / 255`` equals such a threshold
only for v = 51, 102, 153, 204 (t = 0.2, 0.4, 0.6, 0.8): there ``>=`` counts the pixel; under ``>``
the single-precision value of ``invpt`` lies just above the double threshold, so it counts too.

Ground truth (:func:`seism_boundaries`), as ``edgesEvalImg.m`` builds it from what ``db_gt.m`` returns:
``thin(seg2bmap(G))``, where G is the PASCAL-Context ``LabelMap`` (``relabel`` first, which renumbers
disconnected parts of a label and cannot change ``seg2bmap``: a pixel whose diagonal neighbour carries
the same label in another part already differs from its right neighbour) or, for NYUD-v2, the stored
edge map itself (so its lines are outlined by ``seg2bmap``, then thinned back to one pixel).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from densemtl.errors import UserError
from densemtl.metrics.edge_nms import conv_tri, edge_nms, thin

HUNDREDTHS = tuple(k / 100 for k in range(1, 100))  # 0.01 .. 0.99, each the double nearest the decimal


def matlab_uint8(values: np.ndarray) -> np.ndarray:
    """MATLAB's ``uint8(x)``: round half away from zero, saturate to 0..255 (numpy's rint rounds half to even).

    Rounded in float64, where ``x + 0.5`` is exact for any float32 ``x`` in range.
    """
    rounded = np.floor(np.asarray(values, dtype=np.float64) + 0.5)
    return np.clip(rounded, 0, 255).astype(np.uint8)


def truncated_png(prob: np.ndarray) -> np.ndarray:
    """The 8-bit PNG the PyTorch codebases save: ``255 * p`` in single precision, truncated (``astype(uint8)``)."""
    scaled = np.asarray(prob, dtype=np.float32) * np.float32(255)
    return np.clip(np.floor(scaled), 0, 255).astype(np.uint8)


def seism_hed_values(prob: np.ndarray) -> np.ndarray:
    """HED ``nms_process``'s PNG read back by SEISM: ``uint8(nms(convTri(p, 1)) * 255) / 255``."""
    edges = edge_nms(conv_tri(np.asarray(prob, dtype=np.float32), 1))
    return matlab_uint8(edges * np.float32(255)) / 255.0


def invpt_values(prob: np.ndarray) -> np.ndarray:
    """``edgesNmsMex`` of ``im2single`` of the truncated PNG, as the single values SEISM compares."""
    image = truncated_png(prob).astype(np.float32) / np.float32(255)
    return edge_nms(image).astype(np.float64)


def mtlpt_values(prob: np.ndarray) -> np.ndarray:
    """``double(imread(png)) / 255`` of the truncated PNG, no NMS."""
    return truncated_png(prob) / 255.0


@dataclass(frozen=True)
class EdgeProtocol:
    """One codebase's way from a soft boundary map to the pixels SEISM thins and matches per threshold."""

    name: str
    values: Callable[[np.ndarray], np.ndarray]  # soft H x W map -> the float64 map compared with thresholds
    strict: bool  # a pixel counts when value > t (True) or value >= t (False)
    thresholds: tuple[float, ...]


EDGE_PROTOCOLS = {
    protocol.name: protocol
    for protocol in (
        EdgeProtocol("seism-hed", seism_hed_values, strict=False, thresholds=HUNDREDTHS),
        EdgeProtocol("invpt", invpt_values, strict=True, thresholds=(0.001, *HUNDREDTHS, 0.999)),
        EdgeProtocol("mtlpt", mtlpt_values, strict=False, thresholds=HUNDREDTHS),
    )
}


def edge_protocol(name: str) -> EdgeProtocol:
    """The protocol called ``name``, or a UserError listing the known ones."""
    if name not in EDGE_PROTOCOLS:
        raise UserError(f"unknown edge protocol '{name}' (known: {', '.join(EDGE_PROTOCOLS)})")
    return EDGE_PROTOCOLS[name]


def seg2bmap(labels: np.ndarray) -> np.ndarray:
    """SEISM's ``seg2bmap`` at full size: a pixel is a boundary when its label differs from its right, lower
    or lower-right neighbour (last row: right only; last column: lower only; the corner never)."""
    labels = np.asarray(labels)
    bmap = np.zeros(labels.shape, dtype=bool)
    inner = labels[:-1, :-1]
    bmap[:-1, :-1] = (inner != labels[:-1, 1:]) | (inner != labels[1:, :-1]) | (inner != labels[1:, 1:])
    bmap[-1, :-1] = labels[-1, :-1] != labels[-1, 1:]
    bmap[:-1, -1] = labels[:-1, -1] != labels[1:, -1]
    return bmap


def seism_boundaries(labels: np.ndarray) -> np.ndarray:
    """SEISM's ground truth ``thin(seg2bmap(labels))`` as float32 H x W (1 = boundary)."""
    return thin(seg2bmap(labels)).astype(np.float32)
