"""Scores of class-probability predictions with scikit-learn (numpy only, shared by the engine and the
ensembles). Which metrics exist, which tasks they fit and which way they point: `distrain.tasks`.

Decision metrics (accuracy, F1, kappa, ...) score the decisions: the argmax, or for a binary task
`p(positive) >= threshold` when a threshold is given, or for a multilabel task `p >= threshold` per label.
Probability metrics (ROC AUC, average precision, mAP, log loss) score the probabilities and ignore thresholds.

A multilabel task is recognised by its labels: [n, L] 0/1 rows instead of class indices [n].
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Union

import numpy as np
from sklearn import metrics as skm

from distrain.tasks import METRICS

Threshold = Union[float, Sequence[float], np.ndarray, None]
"""A binary task's threshold on p(positive), or a multilabel task's per-label thresholds (or one for all)."""


def decisions(probs: np.ndarray, threshold: Threshold = None, multilabel: bool = False) -> np.ndarray:
    """Predicted labels [n]: the argmax of [n, C] probabilities, or with `threshold` (binary, C = 2)
    label 1 where p(positive) >= threshold. Multilabel: [n, L] 0/1, each label where p >= its threshold (0.5
    when None)."""
    if multilabel:
        return (probs >= np.asarray(0.5 if threshold is None else threshold, dtype=np.float64)).astype(np.int64)
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
    if _class_indices(labels) and _class_indices(pred):
        return _single_label_score(metric, labels, pred.astype(np.int64, copy=False))
    if metric == "accuracy":
        return float(skm.accuracy_score(labels, pred))
    if metric == "balanced_accuracy":
        return float(skm.balanced_accuracy_score(labels, pred))
    if metric == "qwk":
        return float(skm.cohen_kappa_score(labels, pred, weights="quadratic"))
    average = {"f1": "binary", "f1_macro": "macro", "f1_micro": "micro"}[metric]
    return float(skm.f1_score(labels, pred, average=average, zero_division=0))


def _class_indices(a: np.ndarray) -> bool:
    """A non-empty vector of non-negative integers (or bools): what the counting path takes."""
    return a.ndim == 1 and len(a) > 0 and (a.dtype.kind in "biu") and int(a.min()) >= 0


def _single_label_score(metric: str, labels: np.ndarray, pred: np.ndarray) -> float:
    """scikit-learn's score of class indices, from per-class counts (np.bincount): the ensembles and the threshold
    grids call this thousands of times per study, where scikit-learn's input checks and label sorting cost more
    than the arithmetic. Classes are those in `labels` or `pred`, as scikit-learn's are; the binary F1 is the
    positive class's (1). O(rows + classes), but QWK (a confusion matrix over the classes present). Bit for bit
    equal to scikit-learn's: tests/study/test_metrics.py."""
    labels = labels.astype(np.int64, copy=False)
    if metric == "qwk":
        return _qwk(labels, pred)
    tp, true, predicted = _class_counts(labels, pred)
    if metric == "f1":
        return _f1(tp[1], predicted[1] - tp[1], true[1] - tp[1])
    present = (true + predicted) > 0
    tp, true, predicted = tp[present], true[present], predicted[present]
    if metric in ("accuracy", "f1_micro"):  # micro F1 of single-label decisions is their accuracy
        return float(tp.sum() / len(labels))
    if metric == "balanced_accuracy":
        return float(np.mean(tp[true > 0] / true[true > 0]))
    return float(np.mean([_f1(t, p - t, r - t) for t, p, r in zip(tp, predicted, true)]))  # f1_macro


def _class_counts(labels: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per class id 0..max: (true positives, samples labelled, samples predicted), as floats. Few classes: one
    bincount of the confusion matrix (the fastest); many: three bincounts, so memory stays O(rows + classes)."""
    m = int(max(labels.max(), pred.max(), 1)) + 1
    if m * m <= 4 * len(labels) + 4096:
        cm = np.bincount(labels * m + pred, minlength=m * m).reshape(m, m).astype(np.float64)
        return np.diag(cm), cm.sum(axis=1), cm.sum(axis=0)
    true = np.bincount(labels, minlength=m).astype(np.float64)
    predicted = np.bincount(pred, minlength=m).astype(np.float64)
    return np.bincount(labels[labels == pred], minlength=m).astype(np.float64), true, predicted


def _qwk(labels: np.ndarray, pred: np.ndarray) -> float:
    """Quadratic weighted kappa over the classes present, weighted by their positions, in scikit-learn's order of
    operations (so that the result is bit-identical). NaN with one class, as scikit-learn's."""
    m = int(max(labels.max(), pred.max())) + 1
    if m * m > 4 * len(labels) + 4096:  # sparse class ids: renumber those present first
        _, ids = np.unique(np.concatenate([labels, pred]), return_inverse=True)
        labels, pred, m = ids[: len(labels)], ids[len(labels) :], int(ids.max()) + 1
    cm = np.bincount(labels * m + pred, minlength=m * m).reshape(m, m)
    present = (cm.sum(axis=0) + cm.sum(axis=1)) > 0
    cm = cm[present][:, present]
    k = np.arange(len(cm))
    weights = (k[:, None] - k[None, :]) ** 2
    expected = np.outer(cm.sum(axis=0), cm.sum(axis=1)) / cm.sum()
    with np.errstate(invalid="ignore", divide="ignore"):
        return float(1 - np.sum(weights * cm) / np.sum(weights * expected))


def _f1(tp: float, fp: float, fn: float) -> float:
    """F1 from counts; 0 where it is undefined (no positive predicted or present), scikit-learn's zero_division=0."""
    return float(2 * tp / (2 * tp + fp + fn)) if tp else 0.0


def score(metric: str, labels: np.ndarray, probs: np.ndarray, threshold: Threshold = None) -> float:
    """The metric of [n, C] probabilities against integer labels [n] (multilabel: 0/1 labels [n, L])."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}")
    multilabel = labels.ndim == 2
    if not METRICS[metric].on_probabilities:
        return score_labels(metric, labels, decisions(probs, threshold, multilabel))
    probs = probs.astype(np.float64)
    if multilabel:
        return _multilabel_probability_score(metric, labels, probs)
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


def _multilabel_probability_score(metric: str, labels: np.ndarray, probs: np.ndarray) -> float:
    """log_loss: the mean binary cross-entropy over every (sample, label). map / roc_auc: the unweighted mean
    over the labels that can be scored here (a positive for AP; both values for AUC), as `_roc_auc` does for
    classes (scikit-learn's macro average when every label can be); NaN when none can."""
    if metric == "log_loss":
        return float(skm.log_loss(labels.ravel(), probs.ravel(), labels=[0, 1]))
    scores = []
    for j in range(labels.shape[1]):
        y = labels[:, j]
        if metric == "map" and y.any():
            scores.append(skm.average_precision_score(y, probs[:, j]))
        elif metric == "roc_auc" and 0 < y.sum() < len(y):
            scores.append(skm.roc_auc_score(y, probs[:, j]))
    return float(np.mean(scores)) if scores else float("nan")


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


def tune_label_thresholds(metric: str, labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Multilabel: one threshold per label [L], each maximising that label's own F1 (for f1_macro, where this is
    the optimum, and f1_micro) or its own accuracy (for exact-match accuracy), on a grid of 0.01 steps (the one
    nearest 0.5 among equals). All 0.5 for a probability metric."""
    n_labels = labels.shape[1]
    if METRICS[metric].on_probabilities:
        return np.full(n_labels, 0.5)
    grid = np.round(np.arange(0.01, 1.0, 0.01), 2)
    grid = grid[np.argsort(np.abs(grid - 0.5), kind="stable")]
    best = np.empty(n_labels)
    for j in range(n_labels):
        pred = probs[:, j, None] >= grid[None, :]  # [n, grid]: every threshold's decisions at once
        truth = labels[:, j, None].astype(bool)
        tp, fp, fn = (pred & truth).sum(0), (pred & ~truth).sum(0), (~pred & truth).sum(0)
        if metric == "accuracy":
            per_threshold = 1.0 - (fp + fn) / len(truth)
        else:
            per_threshold = 2 * tp / np.maximum(2 * tp + fp + fn, 1)  # F1, 0 when there is nothing to find
        best[j] = grid[int(np.argmax(per_threshold))]
    return best
