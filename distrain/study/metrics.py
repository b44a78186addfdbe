"""Scores of class-probability predictions with scikit-learn (numpy only, shared by the engine and the
ensembles). Which metrics exist, which tasks they fit and which way they point: `distrain.tasks`.

Decision metrics (accuracy, F1, kappa, ...) score the decisions: the argmax, or for a binary task
`p(positive) >= threshold` when a threshold is given. Probability metrics (ROC AUC, average precision, log
loss) score the probabilities and ignore thresholds.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
from sklearn import metrics as skm

from distrain.tasks import METRICS


def decisions(probs: np.ndarray, threshold: Optional[float] = None) -> np.ndarray:
    """Predicted labels [n]: the argmax of [n, C] probabilities, or with `threshold` (binary, C = 2)
    label 1 where p(positive) >= threshold."""
    if threshold is None:
        return probs.argmax(axis=1)
    return (probs[:, 1] >= threshold).astype(np.int64)


def score_labels(metric: str, labels: np.ndarray, pred: np.ndarray) -> float:
    """A decision metric of predicted labels. Raises ValueError for a probability metric (labels alone
    cannot give a ROC AUC or a log loss)."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}")
    if METRICS[metric].on_probabilities:
        raise ValueError(f"{metric} needs probabilities, not labels")
    if metric == "accuracy":
        return float(skm.accuracy_score(labels, pred))
    if metric == "balanced_accuracy":
        return float(skm.balanced_accuracy_score(labels, pred))
    if metric == "qwk":
        return float(skm.cohen_kappa_score(labels, pred, weights="quadratic"))
    average = {"f1": "binary", "f1_macro": "macro", "f1_micro": "micro"}[metric]
    return float(skm.f1_score(labels, pred, average=average, zero_division=0))


def score(metric: str, labels: np.ndarray, probs: np.ndarray, threshold: Optional[float] = None) -> float:
    """The metric of [n, C] probabilities against integer labels [n]."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}")
    if not METRICS[metric].on_probabilities:
        return score_labels(metric, labels, decisions(probs, threshold))
    probs = probs.astype(np.float64)
    classes = np.arange(probs.shape[1])
    if metric == "log_loss":
        return float(skm.log_loss(labels, probs / probs.sum(axis=1, keepdims=True), labels=classes))
    if metric == "average_precision":
        return float(skm.average_precision_score(labels, probs[:, 1]))
    return _roc_auc(labels, probs)


def _roc_auc(labels: np.ndarray, probs: np.ndarray) -> float:
    """Binary: of p(positive). Multiclass: one-vs-rest, unweighted mean over the classes present in `labels`
    (scikit-learn's `multi_class="ovr"` when all are; it refuses a sample that lacks a class, as a small
    validation fold or the train-probe sample of a rare class can). NaN when only one class is present."""
    present = np.unique(labels)
    if len(present) < 2:
        return float("nan")
    if probs.shape[1] == 2:
        return float(skm.roc_auc_score(labels, probs[:, 1]))
    return float(np.mean([skm.roc_auc_score(labels == c, probs[:, c]) for c in present]))


def tune_threshold(metric: str, labels: np.ndarray, probs: np.ndarray) -> float:
    """The decision threshold on p(positive) that scores `metric` best on these rows (a grid of 0.01 steps;
    the one nearest 0.5 among equals). 0.5 for a probability metric, which thresholds do not change."""
    if METRICS[metric].on_probabilities:
        return 0.5
    grid = np.round(np.arange(0.01, 1.0, 0.01), 2)
    grid = grid[np.argsort(np.abs(grid - 0.5), kind="stable")]  # ties go to the threshold nearest 0.5
    scores = [score_labels(metric, labels, (probs[:, 1] >= t).astype(np.int64)) for t in grid]
    sign = 1.0 if METRICS[metric].higher_is_better else -1.0
    return float(grid[int(np.argmax(sign * np.asarray(scores)))])
