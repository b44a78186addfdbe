"""Detection ensembles over columns: box voting >= k of n and map averaging beat every column when each column
misses some words and invents its own false ones; the holdout's fold vote."""

import numpy as np
import pytest

from distrain.tasks.detection.ensembles import detection_ensembles, fold_vote
from distrain.tasks.detection.geometry import TextRegions
from distrain.tasks.detection.postprocess import PostprocessSettings
from distrain.tasks.detection.targets import db_targets

GRID = {"thresh": (0.3,), "box_thresh": (0.4, 0.6), "unclip_ratio": (1.5,)}


def word(x0, y0):
    return np.array([[x0, y0], [x0 + 40, y0], [x0 + 40, y0 + 14], [x0, y0 + 14]], float)


def noisy_columns(n_images=12, n_columns=5, seed=0):
    """Truth: 3 words per image. Column m finds each word with probability 0.75 and adds one false word of its
    own (where no other column puts one)."""
    rng = np.random.default_rng(seed)
    truths = [TextRegions([word(4, 4 + 30 * r) for r in range(3)]) for _ in range(n_images)]
    maps = np.zeros((n_images, n_columns, 96, 96), np.float32)
    for j, truth in enumerate(truths):
        for m in range(n_columns):
            found = [p for p in truth.polygons if rng.random() < 0.75]
            false = [word(52, 4 + 18 * m)]  # right half, a different row per column
            maps[j, m] = db_targets(TextRegions(found + false), 96, 96).shrink_map * 0.9
    return maps, truths, np.arange(n_images) % 3


def test_voting_and_map_averaging_beat_every_column():
    maps, truths, folds = noisy_columns()
    scores = detection_ensembles(lambda j: maps[j], 5, truths, folds, k=3, grid=GRID)
    best_column = max(scores[f"column-{m}"].cv for m in range(5))
    assert scores["box_vote"].cv > best_column + 0.1, {k: v.cv for k, v in scores.items()}
    assert scores["box_vote"].extra["precision"] == pytest.approx(1.0)  # no false word has 3 votes
    assert scores["map_average"].cv > best_column  # a false word averages to 0.18: below any box_thresh
    assert scores["column-0"].tuned["per_fold"].keys() == {"0", "1", "2"}


def test_fold_vote_of_one_holdout_image():
    maps, truths, _ = noisy_columns(n_images=1)
    counts = fold_vote(list(maps[0]), truths[0], PostprocessSettings(box_thresh=0.4), k=3)
    assert counts.detections <= 3 and counts.matched == counts.detections  # only true words reach 3 of 5
