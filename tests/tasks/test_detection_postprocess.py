"""DB post-processing: a perfect probability map (the kernels of the targets) gives back the words."""

import numpy as np
import pytest

from distrain.tasks.detection.geometry import TextRegions, iou_matrix
from distrain.tasks.detection.hmean import count_matches
from distrain.tasks.detection.postprocess import PostprocessSettings, boxes_from_map, ordered_corners
from distrain.tasks.detection.targets import db_targets


def box(x0, y0, x1, y1):
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=float)


WORDS = TextRegions([box(10, 10, 70, 30), box(90, 12, 150, 28), box(10, 60, 120, 84)])


def test_the_kernels_of_the_targets_unclip_back_to_the_words():
    prob = db_targets(WORDS, 100, 160).shrink_map
    found = boxes_from_map(prob, PostprocessSettings())
    assert len(found) == 3 and np.allclose(found.scores, 1.0)
    iou, _ = iou_matrix(WORDS.polygons, found.polygons)
    assert (iou.max(axis=1) > 0.8).all(), iou
    assert count_matches(WORDS, found).hmean == 1.0


def test_thresholds_scale_and_candidate_limit():
    prob = db_targets(WORDS, 100, 160).shrink_map * np.where(np.arange(160) < 80, 0.9, 0.5)[None, :]
    # the first word lies left of x = 80 (score 0.9), the second right of it (0.5), the third across it
    assert len(boxes_from_map(prob, PostprocessSettings(box_thresh=0.8))) == 1
    assert len(boxes_from_map(prob, PostprocessSettings(box_thresh=0.4))) == 3
    cut = boxes_from_map(prob, PostprocessSettings(thresh=0.6, box_thresh=0.4))  # the weak parts binarised away
    assert len(cut) == 2 and max(p[:, 0].max() for p in cut.polygons) < 90
    assert len(boxes_from_map(prob, PostprocessSettings(box_thresh=0.4, max_candidates=2))) == 2
    tall = TextRegions([WORDS.polygons[0], WORDS.polygons[2]])  # 20 and 24 px tall: kernels of 3+ rows at stride 2
    half = db_targets(tall, 100, 160).shrink_map[::2, ::2]  # a map at stride 2
    found = boxes_from_map(half, PostprocessSettings(min_size=1.0), scale=(2.0, 2.0))
    assert count_matches(tall, found).hmean == 1.0


def test_noise_specks_are_dropped_and_corners_are_ordered():
    prob = np.zeros((50, 50), np.float32)
    prob[10, 10] = prob[30:32, 30:32] = 1.0  # specks below min_size
    assert len(boxes_from_map(prob, PostprocessSettings())) == 0
    corners = ordered_corners(((20.0, 10.0), (10.0, 4.0), 0.0))
    np.testing.assert_allclose(corners, [[15, 8], [25, 8], [25, 12], [15, 12]])
    assert pytest.approx(corners[:, 0].mean()) == 20.0
