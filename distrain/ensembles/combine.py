"""Every ensemble of a study, each with a leakage-free CV score and a holdout test score, side by side.

Leakage: every score called "cv" here is computed on samples whose predictions were made without
their labels. Weighted voting and stacking are fitted on the other folds' OOF rows and scored on the
held-out fold, using the SAME fold ids as the base models; only the final test-time weights /
meta-learner are fitted on all OOF rows.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from distrain.config import EnsembleConfig
from distrain.ensembles.selection import cross_validated_selection
from distrain.ensembles.stacking import StackingResult, stack
from distrain.ensembles.store import OOFStore
from distrain.ensembles.thresholds import tuned_threshold_scores
from distrain.ensembles.voting import fit_vote_weights, k_of_n_vote, soft_vote
from distrain.names import Ensemble
from distrain.study.plan import parse_column
from distrain.tasks import METRICS, Task, best_index


@dataclass
class EnsembleOutcome:
    scores: dict[str, dict[str, Optional[float]]]  # name -> {"cv": float, "test": float | None}
    base: dict  # per-job, per-column, per-model summaries
    weights: dict[str, float]  # weighted-vote weights per column (test-time)
    oof_predictions: dict[str, np.ndarray]  # name -> the task's decisions on OOF (for plots)
    stacking: Optional[StackingResult]
    vote_k: int
    vote_n_oof: int
    vote_n_test: int
    skipped: dict[str, str] = field(default_factory=dict)  # ensemble name -> why it was not built
    thresholds: dict[str, dict] = field(default_factory=dict)  # tasks with thresholds: ensemble -> tuned scores
    selection: dict = field(default_factory=dict)  # greedy selection: test-time weights, each fold's, rounds


@dataclass
class _Scorer:
    """The task's metric on the OOF labels and, when the data set has a holdout, on the test labels."""

    store: OOFStore
    metric: str
    task: Task

    @property
    def has_test(self) -> bool:
        return self.store.test is not None and self.store.test_labels is not None

    def decide(self, probs: np.ndarray) -> np.ndarray:
        """The task's decisions at its default rule."""
        return self.task.decide(probs)

    def cv(self, probs: np.ndarray) -> float:
        return self.task.score(self.metric, self.store.labels, probs)

    def test(self, probs: Optional[np.ndarray]) -> Optional[float]:
        if not self.has_test or probs is None:
            return None
        return self.task.score(self.metric, self.store.test_labels, probs)

    def cv_labels(self, pred: np.ndarray) -> float:
        return self.task.score_decisions(self.metric, self.store.labels, pred)

    def test_labels(self, pred_of_test: callable) -> Optional[float]:
        return self.task.score_decisions(self.metric, self.store.test_labels, pred_of_test()) if self.has_test else None


def run_ensembles(
    store: OOFStore,
    metric: str,
    ec: EnsembleConfig,
    *,
    task: Task,
    seed: int = 0,
    test_by_job: Optional[np.ndarray] = None,
    pinned: tuple[str, ...] = (),
) -> EnsembleOutcome:
    """Base summaries, the voting variants and stacking, each with a leakage-free CV score and a test score;
    for a task that tunes thresholds also each probability ensemble's scores at decision thresholds tuned on OOF.

    `ec`: the ensemble settings (vote fraction and threshold, selection rounds, stacking's); `seed`: stacking's.
    test_by_job [J, n_test, C]: each fold model's own test probabilities (for the single-model summaries).
    pinned: columns the greedy selection starts from (`ensemble.members.pin`).
    """
    s = _Scorer(store, metric, task)
    scores: dict[str, dict[str, Optional[float]]] = {}
    preds: dict[str, np.ndarray] = {}
    probs: dict[str, tuple[np.ndarray, Optional[np.ndarray]]] = {}  # probability ensembles: (OOF, test)
    base = _singles(s, test_by_job, scores, preds, probs)
    weights, skipped = _weighted_vote(s, scores, preds, probs, ec.stacking)
    selection = {}
    if Ensemble.WEIGHTED_VOTE not in skipped:
        selection = _selection(s, ec.selection_rounds, pinned, scores, preds, probs)
    elif ec.selection_rounds:
        skipped[Ensemble.SELECTION] = skipped[Ensemble.WEIGHTED_VOTE]
    if METRICS[metric].on_probabilities:  # hard and k-of-n votes give labels only
        why = f"gives labels; {metric} scores probabilities"
        skipped.update(hard_vote=why, k_of_n_vote=why)
        vote_k, n_voters = 0, len(store.columns)
    else:
        vote_k, n_voters = _k_of_n(s, ec.vote_fraction, ec.vote_threshold, scores, preds)
    stacked = None
    if ec.stacking and Ensemble.STACKING not in skipped:
        stacked = stack(store, ec, task, seed)
        scores["stacking"] = {"cv": s.cv(stacked.oof_probs), "test": s.test(stacked.test_probs)}
        preds["stacking"] = s.decide(stacked.oof_probs)
        probs["stacking"] = (stacked.oof_probs, stacked.test_probs)
    thresholds = {}
    if task.tunes_thresholds and not METRICS[metric].on_probabilities and len(set(store.folds.tolist())) > 1:
        test_labels = store.test_labels if s.has_test else None
        thresholds = {name: tuned_threshold_scores(task, metric, store.labels, oof, store.folds, test_labels, test)
                      for name, (oof, test) in probs.items()}  # fmt: skip
    return EnsembleOutcome(
        scores=scores,
        base=base,
        weights=dict(zip(store.columns, map(float, weights))),
        selection=selection,
        oof_predictions=preds,
        stacking=stacked,
        vote_k=vote_k,
        vote_n_oof=n_voters,
        vote_n_test=n_voters,
        skipped=skipped,
        thresholds=thresholds,
    )


def _singles(s: _Scorer, test_by_job: Optional[np.ndarray], scores: dict, preds: dict, probs: dict) -> dict:
    """best_single, mean_single, fold_average, soft_vote and, unless the metric scores probabilities, hard_vote;
    returns the per-job / column / model summaries."""
    store = s.store
    col_cv = [s.cv(store.oof[k]) for k in range(len(store.columns))]
    col_test = [s.test(store.test[k]) if s.has_test else None for k in range(len(store.columns))]
    per_model = {}
    for m in sorted({parse_column(c)[0] for c in store.columns}):
        idx = [k for k, c in enumerate(store.columns) if parse_column(c)[0] == m]
        per_model[m] = {
            "seeds": len(idx),
            "cv": s.cv(store.oof[idx].mean(0)),
            "test": s.test(store.test[idx].mean(0)) if s.has_test else None,
        }
    best_k = best_index(s.metric, col_cv)
    best_oof, chosen = _best_column_per_fold(s, best_k)
    scores["best_single"] = {"cv": s.cv(best_oof), "test": col_test[best_k], "column": store.columns[best_k],
                             "fold_columns": chosen}  # fmt: skip
    scores["mean_single"] = {"cv": float(np.mean(col_cv)), "test": float(np.mean(col_test)) if s.has_test else None}
    preds["best_single"] = s.decide(best_oof)
    probs["best_single"] = (best_oof, store.test[best_k] if s.has_test else None)
    fold_avg_test = test_by_job.mean(0) if test_by_job is not None else (store.test.mean(0) if s.has_test else None)
    scores["fold_average"] = {"cv": float(np.mean([j["val_score"] for j in store.jobs])), "test": s.test(fold_avg_test)}
    _plain_votes(s, scores, preds, probs)
    return {
        "jobs": {j["id"]: j["val_score"] for j in store.jobs},
        "columns": {c: {"cv": col_cv[k], "test": col_test[k]} for k, c in enumerate(store.columns)},
        "seed_averaged_models": per_model,
    }


def _best_column_per_fold(s: _Scorer, best_k: int) -> tuple[np.ndarray, dict[str, str]]:
    """OOF probabilities where each held-out fold is predicted by the column with the best mean score over the
    other folds, and that column per fold. The best column's own CV is the best of n noisy scores on the very
    labels that chose it (optimistic, more so with more columns); this one never uses a sample's label to choose
    the column that predicts it. Each column is scored once per fold (the cost of one CV score per column, also
    for ROC AUC). With one trained fold there are no other rows: the best column's own (`best_k`)."""
    store = s.store
    folds = sorted(set(store.folds.tolist()))
    out = store.oof[best_k].copy()
    if len(folds) < 2:
        return out, {str(f): store.columns[best_k] for f in folds}
    held_out = [store.folds == f for f in folds]
    per_fold = np.array([[s.task.score(s.metric, store.labels[h], store.oof[k][h]) for h in held_out]
                         for k in range(len(store.columns))])  # fmt: skip
    chosen = {}
    for i, f in enumerate(folds):
        with warnings.catch_warnings():  # a column scored NaN on every other fold (one class there): never chosen
            warnings.simplefilter("ignore", RuntimeWarning)
            others = np.nanmean(np.delete(per_fold, i, axis=1), axis=1)
        k = best_index(s.metric, others.tolist())
        out[held_out[i]], chosen[str(f)] = store.oof[k][held_out[i]], store.columns[k]
    return out, chosen


def _plain_votes(s: _Scorer, scores: dict, preds: dict, probs: dict) -> None:
    """soft_vote (mean probability) and, for a decision metric, hard_vote (majority of argmaxes)."""
    store = s.store
    soft_oof, soft_test = soft_vote(store.oof), soft_vote(store.test) if s.has_test else None
    scores["soft_vote"] = {"cv": s.cv(soft_oof), "test": s.test(soft_test)}
    preds["soft_vote"] = s.decide(soft_oof)
    probs["soft_vote"] = (soft_oof, soft_test)
    if METRICS[s.metric].on_probabilities:
        return
    hard_oof = s.task.hard_vote(store.oof)
    scores["hard_vote"] = {
        "cv": s.cv_labels(hard_oof),
        "test": s.test_labels(lambda: s.task.hard_vote(store.test)),
    }
    preds["hard_vote"] = hard_oof


def _weighted_vote(
    s: _Scorer, scores: dict, preds: dict, probs: dict, stacking: bool
) -> tuple[np.ndarray, dict[str, str]]:
    """Weighted voting, fitted per held-out fold on the other folds' OOF rows. With one trained fold
    (cv.only_folds=[k]) there are no other rows: it (and stacking) are skipped and said so, not fitted on
    the rows they are scored on. Returns the test-time weights and what was skipped."""
    store, y = s.store, s.store.labels
    fold_ids = sorted(set(store.folds.tolist()))
    if len(fold_ids) < 2:
        reason = f"needs OOF rows of at least 2 folds; only fold {fold_ids[0]} was trained"
        skipped = {"weighted_vote": reason, **({"stacking": reason} if stacking else {})}
        return np.full(len(store.columns), 1.0 / len(store.columns)), skipped
    weighted_oof = np.zeros(store.oof.shape[1:], dtype=store.oof.dtype)
    for k in fold_ids:
        held = store.folds == k
        weighted_oof[held] = soft_vote(store.oof[:, held], fit_vote_weights(store.oof[:, ~held], y[~held], s.task))
    weights = fit_vote_weights(store.oof, y, s.task)
    weighted_test = soft_vote(store.test, weights) if s.has_test else None
    scores["weighted_vote"] = {"cv": s.cv(weighted_oof), "test": s.test(weighted_test)}
    preds["weighted_vote"] = s.decide(weighted_oof)
    probs["weighted_vote"] = (weighted_oof, weighted_test)
    return weights, {}


def _selection(s: _Scorer, rounds: int, pinned: tuple[str, ...], scores: dict, preds: dict, probs: dict) -> dict:
    """Greedy forward selection over the columns from the pinned ones, cross-validated on the fold ids
    (`ensembles.selection`); nothing when rounds is 0."""
    if not rounds:
        return {}
    store = s.store
    at = tuple(store.columns.index(c) for c in pinned if c in store.columns)  # a failed column cannot be pinned
    oof, weights, fold_weights = cross_validated_selection(store.oof, store.labels, store.folds, s.task, s.metric,
                                                           rounds, at)  # fmt: skip
    test = soft_vote(store.test, weights) if s.has_test else None
    scores["selection"] = {"cv": s.cv(oof), "test": s.test(test)}
    preds["selection"] = s.decide(oof)
    probs["selection"] = (oof, test)
    return {
        "weights": dict(zip(store.columns, map(float, weights))),
        "fold_weights": fold_weights,
        "rounds": rounds,
        "pinned": [store.columns[k] for k in at],
    }


def _k_of_n(s: _Scorer, vote_fraction: float, threshold: float, scores: dict, preds: dict) -> tuple[int, int]:
    """'At least k of n' voting over the (model, seed) columns, on OOF and on test alike (a column's test
    probabilities are its fold average), so the CV score estimates the rule applied to test. Voting the
    individual fold models on test would be another rule (k of 10 instead of k of 2 in the digits run) that no
    OOF sample can score. Returns (k, n)."""
    store = s.store
    n = len(store.columns)
    k = max(1, math.ceil(vote_fraction * n))

    def vote(probs: np.ndarray) -> np.ndarray:
        return s.task.k_of_n_decisions(k_of_n_vote(probs, k, threshold), soft_vote(probs))

    kofn_oof = vote(store.oof)
    scores["k_of_n_vote"] = {"cv": s.cv_labels(kofn_oof), "test": s.test_labels(lambda: vote(store.test))}
    preds["k_of_n_vote"] = kofn_oof
    return k, n
