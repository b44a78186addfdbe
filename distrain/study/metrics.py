"""Scores of class-probability predictions (numpy only, shared by the engine and the ensembles)."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score


def score_labels(metric: str, labels: np.ndarray, pred: np.ndarray) -> float:
    """The configured metric (higher is better) of hard predictions."""
    if metric == "accuracy":
        return float(accuracy_score(labels, pred))
    if metric == "balanced_accuracy":
        return float(balanced_accuracy_score(labels, pred))
    if metric == "f1_macro":
        return float(f1_score(labels, pred, average="macro"))
    raise ValueError(f"unknown metric {metric!r}")


def score(metric: str, labels: np.ndarray, probs: np.ndarray) -> float:
    """The configured metric of argmax predictions."""
    return score_labels(metric, labels, probs.argmax(axis=1))
