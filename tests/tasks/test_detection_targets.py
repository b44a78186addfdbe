"""DB targets of known polygons: the kernel is the polygon shrunk by D = A (1 - r^2) / L, the threshold map is
1 - d / D over the band around its border, scaled to [0.3, 0.7]; don't-care and tiny text are masked out."""

import numpy as np
import pytest

from distrain.tasks.detection.geometry import TextRegions
from distrain.tasks.detection.targets import db_targets, distance_to_border, offset_distance


def box(x0, y0, x1, y1):
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=float)


def test_a_rectangles_kernel_and_threshold_band():
    """A 40 x 20 box at (10, 20): A = 800, L = 120, D = 800 * 0.84 / 120 = 5.6 px."""
    rect = box(10, 20, 50, 40)
    assert offset_distance(rect, 0.4) == pytest.approx(5.6)
    t = db_targets(TextRegions([rect]), 64, 64)
    kernel_rows, kernel_cols = np.nonzero(t.shrink_map)
    # pyclipper offsets the integer polygon by 5.6 px: the kernel spans x 16..44, y 26..34 (rounded corners)
    assert (kernel_cols.min(), kernel_cols.max(), kernel_rows.min(), kernel_rows.max()) == (16, 44, 26, 34)
    assert t.shrink_mask.all()  # nothing masked: every pixel is text or background
    assert t.thresh_map[30, 10] == pytest.approx(0.7)  # on the border: d = 0
    assert t.thresh_map[30, 30] == pytest.approx(0.3)  # the centre, 10 px from the border: d >= D
    assert t.thresh_map[30, 7] == pytest.approx(0.3 + 0.4 * (1 - 3 / 5.6))  # 3 px outside the left edge
    assert t.thresh_map[30, 13] == pytest.approx(0.3 + 0.4 * (1 - 3 / 5.6))  # 3 px inside
    assert t.thresh_mask[30, 5] == 1 and t.thresh_mask[30, 3] == 0  # the grown polygon reaches x = 10 - 5.6
    assert t.thresh_map[0, 0] == pytest.approx(0.3) and t.stacked().shape == (4, 64, 64)


def test_dont_care_and_too_small_text_are_masked_not_background():
    regions = TextRegions([box(2, 2, 30, 12), box(40, 40, 60, 45), box(2, 40, 30, 58)], ignore=[True, False, False])
    t = db_targets(regions, 64, 64)
    assert t.shrink_mask[7, 15] == 0 and t.shrink_map[7, 15] == 0  # don't-care
    assert t.shrink_mask[42, 50] == 0 and t.shrink_map[42, 50] == 0  # 5 px tall: below the 8 px minimum
    assert t.shrink_map[49, 15] == 1 and t.shrink_mask[49, 15] == 1  # ordinary text
    assert t.thresh_mask[7, 15] == 0 and t.thresh_mask[49, 2] == 1  # masked text has no threshold band


def test_distance_to_border_is_the_exact_point_to_segment_distance():
    tri = np.array([[0, 0], [10, 0], [0, 10]], dtype=float)
    xs, ys = np.array([[5.0, -3.0, 5.0]]), np.array([[-2.0, -4.0, 5.0]])
    np.testing.assert_allclose(distance_to_border(xs, ys, tri), [[2.0, 5.0, 0.0]])
