"""Greedy ensemble selection (Caruana et al. 2004, as AutoGluon's weighted ensemble does): forward selection
with replacement over the (model, seed) columns, each round adding the column whose inclusion scores the
study's metric best; a column's weight is how often it was chosen.

Cross-validated like weighted voting: the weights applied to fold k's OOF rows are selected on the other folds'
rows only, so the CV score never uses a sample's own label; the test-time weights are selected on every row.
"""

from __future__ import annotations

import numpy as np

from distrain.tasks import Task, improves


def greedy_selection(
    probs: np.ndarray, labels: np.ndarray, task: Task, metric: str, rounds: int = 25, pinned: tuple[int, ...] = ()
) -> np.ndarray:
    """Weights [M] summing to 1 over the columns of `probs` [M, n, C]: starting from the `pinned` columns (each
    counted once), `rounds` rounds of forward selection with replacement, each adding the column whose
    inclusion makes the mean of the chosen columns score `metric` best (the first column among equals; a round
    that cannot improve still adds its best, as Caruana's does, and the best prefix is kept)."""
    m = probs.shape[0]
    objective = _Objective(task, metric, labels, probs)
    counts = np.zeros(m, dtype=np.int64)
    total = np.zeros(objective.columns.shape[1:], dtype=np.float64)
    for k in pinned:
        counts[k] += 1
        total += objective.columns[k]
    best_counts, best_score = counts.copy(), float("nan")
    for _ in range(rounds):
        chosen = int(counts.sum()) + 1
        scores = [objective.score(total, k, chosen) for k in range(m)]
        pick = 0
        for k in range(1, m):
            if improves(metric, scores[k], scores[pick]):
                pick = k
        counts[pick] += 1
        total += objective.columns[pick]
        if improves(metric, scores[pick], best_score):
            best_counts, best_score = counts.copy(), scores[pick]
    return best_counts / best_counts.sum()


class _Objective:
    """`metric` of the mean of the chosen columns plus one more, called rounds x columns x (folds + 1) times per
    selection, so computed with numpy where it can be (scikit-learn's input checks cost more than the arithmetic):
    for a task deciding by the argmax, accuracy on class-major columns [M, C, n] (a max over C contiguous rows
    instead of a per-row argmax: 2-3x faster at 100k rows) and log loss; the task's `score` otherwise."""

    def __init__(self, task: Task, metric: str, labels: np.ndarray, probs: np.ndarray):
        self.task, self.metric, self.labels = task, metric, labels
        self.single = task.argmax_decisions
        self.class_major = self.single and metric == "accuracy"
        self.columns = np.ascontiguousarray(probs.transpose(0, 2, 1)) if self.class_major else probs
        self.rows = np.arange(len(labels))

    def score(self, total: np.ndarray, k: int, r: int) -> float:
        """The metric of (total + column k) / r, `total` being the sum of the r - 1 columns chosen so far."""
        summed = total + self.columns[k]
        if self.class_major:
            return self._accuracy(summed)
        if self.single and self.metric == "log_loss":  # as scikit-learn's: rows renormalised, clipped at float eps
            p = summed[self.rows, self.labels] / summed.sum(axis=1)
            return float(-np.log(np.clip(p, np.finfo(self.columns.dtype).eps, 1.0)).mean())
        return self.task.score(self.metric, self.labels, summed / r)

    def _accuracy(self, summed: np.ndarray) -> float:
        """Accuracy of the argmax over classes of class-major sums [C, n], ties going to the first class as
        argmax's do (rows with a tied maximum, rare, are decided by argmax itself)."""
        top = summed.max(axis=0)
        correct = summed[self.labels, self.rows] >= top
        tied = np.flatnonzero(correct & ((summed == top).sum(axis=0) > 1))
        if len(tied):
            correct[tied] = summed[:, tied].argmax(axis=0) == self.labels[tied]
        return float(correct.mean())


def cross_validated_selection(
    probs: np.ndarray,
    labels: np.ndarray,
    folds: np.ndarray,
    task: Task,
    metric: str,
    rounds: int = 25,
    pinned: tuple[int, ...] = (),
) -> tuple[np.ndarray, np.ndarray, dict[str, list[float]]]:
    """(OOF probabilities [n, C] with fold k's rows weighted by a selection made without them, the test-time
    weights [M] selected on every row, each fold's weights)."""
    oof = np.zeros(probs.shape[1:], dtype=np.float64)
    fold_weights = {}
    for k in sorted(set(folds.tolist())):
        held = folds == k
        w = greedy_selection(probs[:, ~held], labels[~held], task, metric, rounds, pinned)
        oof[held] = np.tensordot(w, probs[:, held], axes=1)
        fold_weights[str(k)] = w.tolist()
    return oof, greedy_selection(probs, labels, task, metric, rounds, pinned), fold_weights
