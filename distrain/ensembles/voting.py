"""Voting over (model, seed) columns: soft, hard, weighted (log-loss optimal weights) and k-of-n. Multilabel
probabilities [M, n, L] are voted per label."""

from __future__ import annotations

from typing import Optional

import numpy as np
from scipy.optimize import minimize


def soft_vote(probs: np.ndarray, weights: Optional[np.ndarray] = None) -> np.ndarray:
    """Mean (or weighted mean) of probabilities over the first axis: [M, n, C] -> [n, C]."""
    if weights is None:
        return probs.mean(axis=0)
    return np.tensordot(weights, probs, axes=1)


def hard_vote(probs: np.ndarray, multilabel: bool = False) -> np.ndarray:
    """Majority vote of each member's argmax; ties broken by the summed probability. Returns labels [n].
    Multilabel: per label, the majority of the members' decisions (p >= 0.5), a tie decided by the mean
    probability; returns 0/1 rows [n, L]."""
    m, n, c = probs.shape
    if multilabel:
        votes = 2 * (probs >= 0.5).sum(axis=0)
        return np.where(votes == m, probs.mean(axis=0) >= 0.5, votes > m).astype(np.int64)
    votes = np.zeros((n, c))
    np.add.at(votes, (np.tile(np.arange(n), m), probs.argmax(axis=2).ravel()), 1)
    summed = probs.sum(axis=0)
    # votes dominate; summed probability (< m, scaled below 1) only orders classes with equal votes
    return (votes + summed / (m + 1)).argmax(axis=1)


def fit_vote_weights(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Non-negative weights summing to 1 that minimise the log loss of the weighted mean (SLSQP); multilabel
    (0/1 label rows [n, L]): the mean binary log loss over every (sample, label)."""
    m = probs.shape[0]
    if labels.ndim == 2:  # the likelihood of each 0/1 label; linear in w too, as the weights sum to 1
        p_true = np.where(labels[None] == 1, probs, 1.0 - probs).reshape(m, -1).astype(np.float64)  # [M, n*L]
    else:
        p_true = probs[:, np.arange(len(labels)), labels].astype(np.float64)  # [M, n]

    def loss_and_grad(w):
        mix = np.clip(w @ p_true, 1e-12, None)
        return -np.log(mix).mean(), -(p_true / mix).mean(axis=1)

    w0 = np.full(m, 1.0 / m)
    res = minimize(
        loss_and_grad,
        w0,
        jac=True,
        method="SLSQP",
        bounds=[(0.0, 1.0)] * m,
        constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1.0, "jac": lambda w: np.ones(m)}],
        options={"maxiter": 200, "ftol": 1e-10},
    )
    w = np.clip(res.x if res.success else w0, 0, None)
    return w / w.sum()


def k_of_n_vote(probs: np.ndarray, k: int, threshold: float) -> np.ndarray:
    """'At least k of n' voting: class c is detected for a sample when at least k members give it
    probability >= threshold (one-vs-rest, so it serves binary and multilabel outputs). Returns a
    boolean [n, C] detection matrix."""
    return (probs >= threshold).sum(axis=0) >= k


def detections_to_labels(detected: np.ndarray, fallback_probs: np.ndarray) -> np.ndarray:
    """Single-label predictions from k-of-n detections: the detected class with the highest mean
    probability; where nothing reaches k votes, the soft vote's argmax."""
    masked = np.where(detected, fallback_probs, -1.0)
    return np.where(detected.any(axis=1), masked.argmax(axis=1), fallback_probs.argmax(axis=1))
