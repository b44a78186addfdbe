"""Polygons and the ICDAR 2015 H-mean, against cases counted by hand."""

import numpy as np
import pytest

from distrain.tasks.detection.geometry import TextRegions, iou_matrix, polygon_area, polygon_problem
from distrain.tasks.detection.hmean import DetectionCounts, count_matches, hmean_counts


def box(x0, y0, x1, y1):
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=float)


def test_polygon_area_and_iou_of_known_boxes():
    assert polygon_area(box(0, 0, 10, 4)) == 40 and polygon_area(box(0, 0, 10, 4)[::-1]) == 40
    iou, inter = iou_matrix([box(0, 0, 10, 10)], [box(5, 0, 15, 10), box(20, 20, 30, 30)])
    assert inter.tolist() == [[50.0, 0.0]]
    assert iou[0, 0] == pytest.approx(50 / 150) and iou[0, 1] == 0


def test_a_twisted_quadrilateral_is_repaired_not_scored_empty():
    bow_tie = np.array([[0, 0], [10, 10], [10, 0], [0, 10]], dtype=float)
    iou, _ = iou_matrix([box(0, 0, 10, 10)], [bow_tie])
    assert iou[0, 0] == pytest.approx(0.5)  # the two triangles, half the square


@pytest.mark.parametrize(
    "points, problem",
    [
        ([[0, 0], [5, 5]], "at least 3 (x, y) points, got 2"),
        ([[0, 0], [5, 0], [5, np.nan]], "non-finite"),
        ([[0, 0], [50, 0], [50, 5]], "outside the 40x30 image (x 0..50, y 0..5)"),
        ([[0, 0], [5, 0], [10, 0]], "no area"),
    ],
)
def test_bad_polygons_are_named(points, problem):
    assert problem in polygon_problem(np.array(points, dtype=float), 40, 30)
    assert polygon_problem(box(0, 0, 40, 30), 40, 30) is None


def test_hmean_of_a_hand_counted_image():
    """Words: A, B (matched), C (split into two halves: IoU 0.5 each, so missed, and both halves false positives),
    D and E (merged into one box: IoU 0.4 each, missed, one false positive), F (missed), and a don't-care word X.
    Detections: A', B', C1, C2, D+E, a box mostly inside X (left out), a stray box (false positive).
    Matched 2 of 6 scored words; 6 scored detections: P = 2/6, R = 2/6, H = 1/3."""
    truth = TextRegions(
        [
            box(0, 0, 40, 10),
            box(0, 20, 40, 30),
            box(0, 40, 100, 50),
            box(0, 60, 40, 70),
            box(60, 60, 100, 70),
            box(0, 80, 40, 90),
            box(120, 0, 160, 10),
        ],  # fmt: skip
        ignore=np.array([0, 0, 0, 0, 0, 0, 1], bool),
    )
    detected = TextRegions(
        [
            box(1, 0, 40, 10),
            box(0, 21, 40, 30),
            box(0, 40, 50, 50),
            box(50, 40, 100, 50),
            box(0, 60, 100, 70),
            box(125, 0, 165, 10),
            box(200, 200, 220, 210),
        ],  # fmt: skip
    )
    counts = count_matches(truth, detected)
    assert counts == DetectionCounts(matched=2, words=6, detections=6)
    assert counts.precision == pytest.approx(1 / 3) and counts.recall == pytest.approx(1 / 3)
    assert counts.hmean == pytest.approx(1 / 3)


def test_matching_is_one_to_one_and_counts_add_over_images():
    truth = TextRegions([box(0, 0, 40, 10)])
    twice = TextRegions([box(0, 0, 40, 10), box(1, 0, 40, 10)])  # two detections of one word: one match
    assert count_matches(truth, twice) == DetectionCounts(1, 1, 2)
    total = hmean_counts([truth, truth, TextRegions()], [twice, TextRegions(), TextRegions([box(0, 0, 5, 5)])])
    assert total == DetectionCounts(matched=1, words=2, detections=3)
    assert total.hmean == pytest.approx(2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2))
    assert DetectionCounts().hmean == 0.0
    with pytest.raises(ValueError, match="2 images of ground truth but 1"):
        hmean_counts([truth, truth], [truth])
