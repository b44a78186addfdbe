"""Decision thresholds of a binary task (one, on p(positive)) or a multilabel task (one per label), tuned on
OOF predictions and scored honestly.

The threshold applied to fold k's OOF rows is chosen on the other folds' rows only, so the tuned CV score
is what tuning does for samples whose labels it never saw; the threshold for test (and the registered
model) is chosen on every OOF row. Scores at 0.5 sit beside the tuned ones.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from distrain.study.metrics import decisions, score, score_labels, tune_label_thresholds, tune_threshold


def tuned_threshold_scores(
    metric: str,
    labels: np.ndarray,
    oof_probs: np.ndarray,
    folds: np.ndarray,
    test_labels: Optional[np.ndarray] = None,
    test_probs: Optional[np.ndarray] = None,
) -> dict:
    """{threshold, fold_thresholds, cv_at_0.5, cv_tuned, test_at_0.5, test_tuned} for binary [n, 2]
    probabilities (a threshold is a float) or multilabel [n, L] ones with 0/1 labels [n, L] (a list per label).
    Needs OOF rows of at least two folds (the caller skips otherwise)."""
    multilabel = labels.ndim == 2

    def tune(y: np.ndarray, p: np.ndarray):
        return tune_label_thresholds(metric, y, p).tolist() if multilabel else tune_threshold(metric, y, p)

    tuned = np.empty(labels.shape, dtype=np.int64)
    fold_thresholds = {}
    for k in sorted(set(folds.tolist())):
        held = folds == k
        fold_thresholds[str(k)] = tune(labels[~held], oof_probs[~held])
        tuned[held] = decisions(oof_probs[held], fold_thresholds[str(k)], multilabel)
    final = tune(labels, oof_probs)
    has_test = test_labels is not None and test_probs is not None
    return {
        "threshold": final,
        "fold_thresholds": fold_thresholds,
        "cv_at_0.5": score(metric, labels, oof_probs, threshold=0.5),
        "cv_tuned": score_labels(metric, labels, tuned),
        "test_at_0.5": score(metric, test_labels, test_probs, threshold=0.5) if has_test else None,
        "test_tuned": score(metric, test_labels, test_probs, threshold=final) if has_test else None,
    }
