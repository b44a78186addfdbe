"""Decision thresholds of a task that `tunes_thresholds` (one on p(positive), or one per label), tuned on OOF
predictions and scored honestly.

The threshold applied to fold k's OOF rows is chosen on the other folds' rows only, so the tuned CV score
is what tuning does for samples whose labels it never saw; the threshold for test (and the registered
model) is chosen on every OOF row. Scores at 0.5 sit beside the tuned ones.
"""

from __future__ import annotations

import functools
from typing import Optional

import numpy as np

from distrain.tasks import Task


def tuned_threshold_scores(
    task: Task,
    metric: str,
    labels: np.ndarray,
    oof_probs: np.ndarray,
    folds: np.ndarray,
    test_labels: Optional[np.ndarray] = None,
    test_probs: Optional[np.ndarray] = None,
) -> dict:
    """{threshold, fold_thresholds, cv_at_0.5, cv_tuned, test_at_0.5, test_tuned}: the task's thresholds (a float
    on p(positive), or a list per label). Needs OOF rows of at least two folds (the caller skips otherwise)."""
    tune = functools.partial(task.tune_threshold, metric)
    tuned = np.empty(labels.shape, dtype=np.int64)
    fold_thresholds = {}
    for k in sorted(set(folds.tolist())):
        held = folds == k
        fold_thresholds[str(k)] = tune(labels[~held], oof_probs[~held])
        tuned[held] = task.decide(oof_probs[held], fold_thresholds[str(k)])
    final = tune(labels, oof_probs)
    has_test = test_labels is not None and test_probs is not None
    return {
        "threshold": final,
        "fold_thresholds": fold_thresholds,
        "cv_at_0.5": task.score(metric, labels, oof_probs, threshold=0.5),
        "cv_tuned": task.score_decisions(metric, labels, tuned),
        "test_at_0.5": task.score(metric, test_labels, test_probs, threshold=0.5) if has_test else None,
        "test_tuned": task.score(metric, test_labels, test_probs, threshold=final) if has_test else None,
    }
