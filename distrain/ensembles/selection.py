"""Greedy ensemble selection (Caruana et al. 2004, as AutoGluon's weighted ensemble does): forward selection
with replacement over the (model, seed) columns, each round adding the column whose inclusion scores the
study's metric best; a column's weight is how often it was chosen.

Cross-validated like weighted voting: the weights applied to fold k's OOF rows are selected on the other folds'
rows only, so the CV score never uses a sample's own label; the test-time weights are selected on every row.
"""

from __future__ import annotations

import numpy as np

from distrain.study.metrics import score
from distrain.tasks import improves


def greedy_selection(probs: np.ndarray, labels: np.ndarray, metric: str, rounds: int = 25) -> np.ndarray:
    """Weights [M] summing to 1 over the columns of `probs` [M, n, C]: `rounds` rounds of forward selection with
    replacement, each adding the column whose inclusion makes the mean of the chosen columns score `metric`
    best (the first column among equals; a round that cannot improve still adds its best, as Caruana's does,
    and the best prefix is kept)."""
    m = probs.shape[0]
    counts = np.zeros(m, dtype=np.int64)
    total = np.zeros(probs.shape[1:], dtype=np.float64)
    best_counts, best_score = counts.copy(), float("nan")
    for r in range(1, rounds + 1):
        scores = [_score(metric, labels, (total + probs[k]) / r) for k in range(m)]
        pick = 0
        for k in range(1, m):
            if improves(metric, scores[k], scores[pick]):
                pick = k
        counts[pick] += 1
        total += probs[pick]
        if improves(metric, scores[pick], best_score):
            best_counts, best_score = counts.copy(), scores[pick]
    return best_counts / best_counts.sum()


def _score(metric: str, labels: np.ndarray, probs: np.ndarray) -> float:
    """`score`, with numpy for the metrics a selection most often optimises (rounds x columns x folds calls;
    scikit-learn's input checks cost more than the arithmetic): single-label accuracy and log loss."""
    if labels.ndim == 1 and metric == "accuracy":
        return float((probs.argmax(axis=1) == labels).mean())
    if labels.ndim == 1 and metric == "log_loss":  # as scikit-learn's: rows renormalised, clipped at float eps
        p = probs[np.arange(len(labels)), labels] / probs.sum(axis=1)
        return float(-np.log(np.clip(p, np.finfo(probs.dtype).eps, 1.0)).mean())
    return score(metric, labels, probs)


def cross_validated_selection(
    probs: np.ndarray, labels: np.ndarray, folds: np.ndarray, metric: str, rounds: int = 25
) -> tuple[np.ndarray, np.ndarray, dict[str, list[float]]]:
    """(OOF probabilities [n, C] with fold k's rows weighted by a selection made without them, the test-time
    weights [M] selected on every row, each fold's weights)."""
    oof = np.zeros(probs.shape[1:], dtype=np.float64)
    fold_weights = {}
    for k in sorted(set(folds.tolist())):
        held = folds == k
        w = greedy_selection(probs[:, ~held], labels[~held], metric, rounds)
        oof[held] = np.tensordot(w, probs[:, held], axes=1)
        fold_weights[str(k)] = w.tolist()
    return oof, greedy_selection(probs, labels, metric, rounds), fold_weights
