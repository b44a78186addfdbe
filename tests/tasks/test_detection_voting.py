"""Box voting >= k of n: kept where enough models agree, one box per model, corners fused by score."""

import numpy as np
import pytest

from distrain.tasks.detection.geometry import TextRegions
from distrain.tasks.detection.voting import vote_boxes


def box(x0, y0, x1, y1):
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=float)


A, B, C = box(0, 0, 40, 10), box(0, 20, 40, 30), box(0, 40, 40, 50)


def members():
    """5 models: A found by 4 (model 0 twice), B by 3, C by 2, a stray box by 1."""
    return [
        TextRegions([A, box(1, 0, 40, 10), B, C], scores=[0.9, 0.8, 0.6, 0.7]),
        TextRegions([box(2, 0, 42, 10), B], scores=[0.5, 0.6]),
        TextRegions([A, box(0, 21, 40, 31), C], scores=[0.9, 0.6, 0.7]),
        TextRegions([A, box(100, 100, 120, 110)], scores=[0.9, 0.9]),
        TextRegions(),
    ]


def test_three_of_five_keeps_the_boxes_three_models_found():
    voted = vote_boxes(members(), k=3)
    assert len(voted) == 2
    a, b = sorted(voted.polygons, key=lambda p: p[0, 1])
    # A: model 0's 0.9 box, model 1's (shifted 2 px, 0.5), model 2's and model 3's at 0.9: x0 = 2 * 0.5 / 3.2
    assert a[0, 0] == pytest.approx(1.0 / 3.2) and a[1, 0] == pytest.approx(40 + 1.0 / 3.2)
    assert voted.scores[np.argmin([p[0, 1] for p in voted.polygons])] == pytest.approx((0.9 + 0.5 + 0.9 + 0.9) / 5)
    assert b[0, 1] == pytest.approx(20 + 0.6 / 1.8)


def test_k_of_one_keeps_everything_once_and_k_of_n_only_what_all_found():
    assert len(vote_boxes(members(), k=1)) == 5  # A, model 0's second A, B, C, the stray
    assert len(vote_boxes(members(), k=4)) == 1
    assert len(vote_boxes(members(), k=5)) == 0
    assert len(vote_boxes([TextRegions(), TextRegions()], k=2)) == 0
    with pytest.raises(ValueError, match="1 <= k <= n models, got k=6 of n=5"):
        vote_boxes(members(), k=6)
