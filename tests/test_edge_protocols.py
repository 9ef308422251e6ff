"""The three boundary protocols on hand-built maps, MATLAB's rounding, and SEISM's ground truth.

Expected counts are worked out by hand in the comments: a vertical one-pixel line of value ``a`` in a zero
map goes through the triangle smoothing exactly (``[1 2 1] / 4`` across the line gives ``a / 2`` on it and
``a / 4`` beside it, the column stays constant along it), the NMS keeps only the middle column, and the
5-pixel border band scales rows 1..4 (and their mirror images) by 0.2, 0.4, 0.6, 0.8 and rows 0 and H-1
by 0. A one-pixel line is its own thinning.
"""

from __future__ import annotations

import typing

import numpy as np
import pytest
from scipy import ndimage

from densemtl.config import EvalConfig
from densemtl.errors import UserError
from densemtl.metrics.boundary import image_counts
from densemtl.metrics.edge_protocols import (
    EDGE_PROTOCOLS,
    EdgeProtocol,
    edge_protocol,
    matlab_uint8,
    seg2bmap,
    seism_boundaries,
    seism_hed_values,
    truncated_png,
)

HEIGHT, WIDTH, COLUMN = 40, 30, 10
TINY = 0.001  # max_dist: a tolerance under one pixel, so only coinciding pixels match


def _line(value: float, column: int = COLUMN) -> np.ndarray:
    soft = np.zeros((HEIGHT, WIDTH), dtype=np.float32)
    soft[:, column] = value
    return soft


def _rows(counts: np.ndarray, protocol: str, thresholds: list[float]) -> dict[float, list[int]]:
    index = {t: i for i, t in enumerate(EDGE_PROTOCOLS[protocol].thresholds)}
    return {t: counts[index[t]].tolist() for t in thresholds}


def test_matlab_rounding_goes_half_away_from_zero() -> None:
    values = np.array([0.5, 1.5, 2.5, 50.5, 254.5, 255.4, 300.0, -0.4, -3.0, 0.49999997], dtype=np.float32)
    assert matlab_uint8(values).tolist() == [1, 2, 3, 51, 255, 255, 255, 0, 0, 0]
    assert np.rint(values[:4]).tolist() == [0, 2, 2, 50]  # what numpy would have written


def test_saved_png_truncates() -> None:
    prob = np.array([0.0, 50.7 / 255, 51.5 / 255, 51 / 255, 0.999, 1.0], dtype=np.float32)
    assert truncated_png(prob).tolist() == [0, 50, 51, 51, 254, 255]


def test_seism_hed_rounding_tie_counts_at_its_threshold() -> None:
    tie = np.float32(50.5 / 255)
    assert tie * np.float32(255) == np.float32(50.5)  # the single product MATLAB rounds is exactly x.5
    soft = _line(2 * tie)  # smoothed: tie on the line, which MATLAB writes as 51 = 0.2 * 255
    gt = _line(1.0)
    counts = image_counts(soft, gt, TINY, np.array(EDGE_PROTOCOLS["seism-hed"].thresholds), protocol="seism-hed")
    h = HEIGHT
    # interior rows: byte 51 (>= 0.2); border rows 1..4: bytes 10, 20, 30, 40 (twice each); rows 0, H-1: 0
    assert _rows(counts, "seism-hed", [0.01, 0.15, 0.19, 0.2, 0.21]) == {
        0.01: [h - 2, h, h - 2, h - 2],
        0.15: [h - 8, h, h - 8, h - 8],  # 40 / 255 = 0.157
        0.19: [h - 10, h, h - 10, h - 10],
        0.2: [h - 10, h, h - 10, h - 10],  # 51 / 255 == 0.2 counts with ">="
        0.21: [0, h, 0, 0],
    }
    # the same values compared with ">": the tie no longer counts (numpy's rint would also give 50 < 51)
    strict = EdgeProtocol("strict", seism_hed_values, strict=True, thresholds=(0.19, 0.2))
    assert image_counts(soft, gt, TINY, np.array(strict.thresholds), protocol=strict)[:, 3].tolist() == [h - 10, 0]


def test_invpt_compares_the_single_value_strictly() -> None:
    soft = _line(np.float32(51.5 / 255))  # truncated to 51, read as single(51 / 255) = 0.2000000030
    gt = _line(1.0)
    counts = image_counts(soft, gt, TINY, np.array(EDGE_PROTOCOLS["invpt"].thresholds), protocol="invpt")
    h = HEIGHT
    # no smoothing: the line keeps 0.2 (single); border rows: 0.04, 0.08, 0.12, 0.16 (twice each)
    assert _rows(counts, "invpt", [0.001, 0.05, 0.1, 0.15, 0.2, 0.21, 0.999]) == {
        0.001: [h - 2, h, h - 2, h - 2],
        0.05: [h - 4, h, h - 4, h - 4],
        0.1: [h - 6, h, h - 6, h - 6],
        0.15: [h - 8, h, h - 8, h - 8],
        0.2: [h - 10, h, h - 10, h - 10],  # single(0.2) > 0.2: counts although the comparison is ">"
        0.21: [0, h, 0, 0],
        0.999: [0, h, 0, 0],
    }
    assert len(EDGE_PROTOCOLS["invpt"].thresholds) == 101


def test_mtlpt_reads_the_truncated_png_without_nms() -> None:
    soft = _line(np.float32(50.7 / 255)) + _line(np.float32(51.2 / 255), column=20)  # bytes 50 and 51
    gt = _line(1.0, column=20)
    counts = image_counts(soft, gt, TINY, np.array(EDGE_PROTOCOLS["mtlpt"].thresholds), protocol="mtlpt")
    h = HEIGHT
    # no NMS, no border band: both full lines count at 0.19, only byte 51 at 0.2 (">="), none above
    assert _rows(counts, "mtlpt", [0.01, 0.19, 0.2, 0.21]) == {
        0.01: [h, h, h, 2 * h],
        0.19: [h, h, h, 2 * h],
        0.2: [h, h, h, h],
        0.21: [0, h, 0, 0],
    }


def test_protocol_names_match_the_config_choices() -> None:
    choices = typing.get_args(typing.get_type_hints(EvalConfig)["edge_protocol"])
    assert set(choices) == set(EDGE_PROTOCOLS)
    assert EvalConfig().edge_protocol == "seism-hed"
    with pytest.raises(UserError, match="unknown edge protocol 'hed'"):
        edge_protocol("hed")


def test_seg2bmap_by_hand() -> None:
    labels = np.array([[1, 1, 2, 2, 2], [1, 1, 2, 2, 2], [3, 3, 3, 2, 2], [3, 3, 3, 3, 3]])
    # a pixel differs from its right, lower or lower-right neighbour; last row: right only; last column:
    # lower only; the corner never
    expected = np.array([[0, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=bool)
    np.testing.assert_array_equal(seg2bmap(labels), expected)


def test_nyud_edge_lines_are_outlined_then_thinned() -> None:
    stored = np.zeros((8, 10))
    stored[3] = 1.0  # a stored one-pixel boundary line
    outline = seg2bmap(stored)
    assert outline[[2, 3]].all() and outline.sum() == 20  # the row above the line and the line itself
    ground_truth = seism_boundaries(stored)
    assert ground_truth.dtype == np.float32
    # bwmorph 'thin' keeps the line's own row, minus the last column's pixel (a corner of the 2 x 10 band)
    expected = np.zeros_like(ground_truth)
    expected[3, :-1] = 1
    np.testing.assert_array_equal(ground_truth, expected)


def test_relabelling_disconnected_parts_cannot_change_seg2bmap() -> None:
    rng = np.random.default_rng(0)
    labels = ndimage.zoom(rng.integers(0, 3, size=(6, 8)), 5, order=0)
    labels[rng.random(labels.shape) < 0.05] = 7  # scattered single pixels: many parts of label 7
    relabelled = np.zeros_like(labels)
    offset = 0
    for value in np.unique(labels):  # SEISM's relabel: every 4-connected part gets its own label
        parts, count = ndimage.label(labels == value)
        relabelled[parts > 0] = parts[parts > 0] + offset
        offset += count
    assert offset > 3
    np.testing.assert_array_equal(seg2bmap(relabelled), seg2bmap(labels))
