"""Voting over (model, seed) columns: soft, weighted (log-loss optimal weights) and k-of-n detections; the task
turns votes into decisions (`Task.hard_vote`, `Task.k_of_n_decisions`)."""

from __future__ import annotations

from typing import Optional

import numpy as np

from distrain.tasks import Task


def soft_vote(probs: np.ndarray, weights: Optional[np.ndarray] = None) -> np.ndarray:
    """Mean (or weighted mean) of probabilities over the first axis: [M, n, C] -> [n, C]."""
    if weights is None:
        return probs.mean(axis=0)
    return np.tensordot(weights, probs, axes=1)


def fit_vote_weights(probs: np.ndarray, labels: np.ndarray, task: Task) -> np.ndarray:
    """Non-negative weights summing to 1 that minimise the log loss of the weighted mean (SLSQP): the mean negative
    log of each member's probability of the true outcomes (`Task.true_probabilities`; linear in the weights, as
    they sum to 1)."""
    m = probs.shape[0]
    p_true = task.true_probabilities(probs, labels).astype(np.float64)  # [M, r]

    def loss_and_grad(w):
        mix = np.clip(w @ p_true, 1e-12, None)
        return -np.log(mix).mean(), -(p_true / mix).mean(axis=1)

    from scipy.optimize import minimize  # here: SciPy's import is slow, and only fitting vote weights needs it

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
    probability >= threshold (one-vs-rest, so it serves one-of-C and label-set outputs). Returns a
    boolean [n, C] detection matrix."""
    return (probs >= threshold).sum(axis=0) >= k
