"""The metrics: which way each points, and their scores of predictions with scikit-learn (numpy only, shared by
the engine and the ensembles). Which metrics a task allows is the task's (`Task.metrics`).

Decision metrics (accuracy, F1, kappa, ...) score decisions (class indices [n], or 0/1 label rows [n, L]);
probability metrics (ROC AUC, average precision, mAP, log loss) score probabilities. A task turns its
probabilities into decisions (`Task.decide`) and chooses which of the scores below applies.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Union

import numpy as np


@dataclass(frozen=True)
class MetricSpec:
    """A metric's direction and what it scores."""

    higher_is_better: bool
    on_probabilities: bool
    """Scored on the probabilities themselves (threshold-free); else on the decisions (argmax / thresholds)."""
    meaning: str


METRICS: dict[str, MetricSpec] = {
    "accuracy": MetricSpec(True, False, "fraction of samples whose decision is right (multilabel: all labels)"),
    "balanced_accuracy": MetricSpec(True, False, "mean recall over classes"),
    "f1": MetricSpec(True, False, "F1 of the positive class (label 1)"),
    "f1_macro": MetricSpec(True, False, "unweighted mean of the per-class (per-label) F1"),
    "f1_micro": MetricSpec(True, False, "F1 over all decisions pooled"),
    "qwk": MetricSpec(True, False, "quadratic weighted Cohen's kappa (ordinal labels)"),
    "roc_auc": MetricSpec(True, True, "ROC AUC (binary: of p(positive); else one-vs-rest / per label, macro)"),
    "average_precision": MetricSpec(True, True, "area under the precision-recall curve of p(positive)"),
    "map": MetricSpec(True, True, "mean over labels of the average precision (mAP)"),
    "log_loss": MetricSpec(False, True, "cross-entropy of the probabilities (lower is better)"),
    "miou": MetricSpec(True, False, "segmentation: mean over the classes present of the IoU of their pixels"),
    "fscore": MetricSpec(
        True, False, "segmentation: mean over the classes present of the F-score (Dice) of their pixels"
    ),
    "pixel_f1": MetricSpec(
        True,
        False,
        "text detection: F1 of the probability map at 0.5 against the shrunk words' "
        "pixels (don't-care pixels left out); the per-epoch score, cheap enough for every epoch",
    ),
}
"""Every metric distrain scores; each task says which of them fit it (`Task.metrics`)."""


def improves(metric: str, new: float, old: float) -> bool:
    """`new` is a better score of `metric` than `old` (anything beats a NaN `old`, the 'no score yet')."""
    if math.isnan(old):
        return not math.isnan(new)
    return new > old if METRICS[metric].higher_is_better else new < old


def best_index(metric: str, scores: list[float]) -> int:
    """Index of the best score (the first of equals)."""
    best = 0
    for i, s in enumerate(scores):
        if improves(metric, s, scores[best]):
            best = i
    return best


def overfit_gap(metric: str, train: float, val: float) -> float:
    """How much better the training fold scores than the validation fold (positive: overfitting), whichever
    way the metric points."""
    return train - val if METRICS[metric].higher_is_better else val - train


Threshold = Union[float, Sequence[float], np.ndarray, None]
"""A decision threshold: one on p(positive), or one per label (or one for all labels)."""


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
        return float(_skm().accuracy_score(labels, pred))
    if metric == "balanced_accuracy":
        return float(_skm().balanced_accuracy_score(labels, pred))
    if metric == "qwk":
        return float(_skm().cohen_kappa_score(labels, pred, weights="quadratic"))
    average = {"f1": "binary", "f1_macro": "macro", "f1_micro": "micro"}[metric]
    return float(_skm().f1_score(labels, pred, average=average, zero_division=0))


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


def score_probabilities(metric: str, labels: np.ndarray, probs: np.ndarray) -> float:
    """A probability metric of [n, C] probabilities against class indices [n], or of [n, L] per-label
    probabilities against 0/1 label rows [n, L]. Raises ValueError for a decision metric (`score_labels`)."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}")
    if not METRICS[metric].on_probabilities:
        raise ValueError(f"{metric} scores decisions, not probabilities")
    probs = probs.astype(np.float64)
    if labels.ndim == 2:
        return _label_rows_probability_score(metric, labels, probs)
    classes = np.arange(probs.shape[1])
    if metric == "log_loss":
        return float(_skm().log_loss(labels, probs / probs.sum(axis=1, keepdims=True), labels=classes))
    if metric == "average_precision":
        return float(_skm().average_precision_score(labels, probs[:, 1]))
    return _roc_auc(labels, probs)


def _roc_auc(labels: np.ndarray, probs: np.ndarray) -> float:
    """Binary: of p(positive). Multiclass: one-vs-rest, unweighted mean over the classes present in `labels`
    (scikit-learn's `multi_class="ovr"` when all are; it refuses a sample that lacks a class, as a small
    validation fold or the train-probe sample of a rare class can). NaN when only one class is present."""
    present = np.unique(labels)
    if len(present) < 2:
        return float("nan")
    if probs.shape[1] == 2:
        return float(_skm().roc_auc_score(labels, probs[:, 1]))
    return float(np.mean([_skm().roc_auc_score(labels == c, probs[:, c]) for c in present]))


def _label_rows_probability_score(metric: str, labels: np.ndarray, probs: np.ndarray) -> float:
    """log_loss: the mean binary cross-entropy over every (sample, label). map / roc_auc: the unweighted mean
    over the labels that can be scored here (a positive for AP; both values for AUC), as `_roc_auc` does for
    classes (scikit-learn's macro average when every label can be); NaN when none can."""
    if metric == "log_loss":
        return float(_skm().log_loss(labels.ravel(), probs.ravel(), labels=[0, 1]))
    scores = []
    for j in range(labels.shape[1]):
        y = labels[:, j]
        if metric == "map" and y.any():
            scores.append(_skm().average_precision_score(y, probs[:, j]))
        elif metric == "roc_auc" and 0 < y.sum() < len(y):
            scores.append(_skm().roc_auc_score(y, probs[:, j]))
    return float(np.mean(scores)) if scores else float("nan")


def _skm():
    """scikit-learn's metrics, imported on first use: it takes seconds, and the counting paths (and `distrain
    sync`, which imports the tasks) need none."""
    from sklearn import metrics

    return metrics
