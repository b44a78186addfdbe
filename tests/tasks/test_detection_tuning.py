"""Post-processing tuned on OOF maps with fold honesty: fold k's settings never see fold k's labels."""

import numpy as np
import pytest

from distrain.tasks.detection.geometry import TextRegions
from distrain.tasks.detection.targets import db_targets
from distrain.tasks.detection.tuning import tune_postprocess

GRID = {"thresh": (0.2, 0.3), "box_thresh": (0.3, 0.6), "unclip_ratio": (1.5,)}


def random_words(rng, n_words=2, size=96):
    """Words at random places, not overlapping (one per horizontal band)."""
    band = size // n_words
    words = []
    for k in range(n_words):
        x0, y0 = rng.integers(2, size - 50), k * band + rng.integers(2, band - 20)
        words.append(np.array([[x0, y0], [x0 + 44, y0], [x0 + 44, y0 + 16], [x0, y0 + 16]], float))
    return TextRegions(words)


def weak_maps(seed=0, n=24, level=0.45):
    """Maps that find every word at probability `level`: MMOCR's default box_thresh 0.6 drops them all."""
    rng = np.random.default_rng(seed)
    truths = [random_words(rng) for _ in range(n)]
    maps = [db_targets(t, 96, 96).shrink_map * level for t in truths]
    return maps, truths, np.arange(n) % 4


def test_tuning_finds_the_box_threshold_the_default_misses():
    maps, truths, folds = weak_maps()
    tuned = tune_postprocess(maps, truths, folds, grid=GRID)
    assert tuned.cv_default == 0.0 and tuned.cv_tuned == pytest.approx(1.0)
    assert tuned.final.box_thresh == 0.3 and all(s.box_thresh == 0.3 for s in tuned.per_fold.values())
    assert set(tuned.as_dict()["per_fold"]) == {"0", "1", "2", "3"}


def test_fold_ks_settings_do_not_depend_on_fold_ks_labels():
    """Fold 0's labels replaced by ones that favour another setting: fold 0's choice is unchanged, while the
    other folds' choices (which see fold 0) and the final one may move."""
    maps, truths, folds = weak_maps()
    before = tune_postprocess(maps, truths, folds, grid=GRID)
    rng = np.random.default_rng(1)
    changed = [random_words(rng) if f == 0 else t for t, f in zip(truths, folds)]
    after = tune_postprocess(maps, changed, folds, grid=GRID)
    assert after.per_fold[0] == before.per_fold[0]
    assert after.cv_tuned < before.cv_tuned  # fold 0 is now scored against labels its maps do not find


def test_with_permuted_labels_the_honest_tuned_score_stays_at_chance():
    maps, truths, folds = weak_maps(n=32, level=0.9)
    order = np.roll(np.arange(len(truths)), 1)  # every image gets another image's words
    tuned = tune_postprocess(maps, [truths[i] for i in order], folds, grid=GRID)
    aligned = tune_postprocess(maps, truths, folds, grid=GRID)
    assert aligned.cv_tuned == pytest.approx(1.0)
    assert tuned.cv_tuned <= tuned.cv_default + 0.05 and tuned.cv_tuned < 0.2, tuned
