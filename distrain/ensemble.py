"""Ensembles over out-of-fold (OOF) predictions: voting and LightGBM stacking. numpy, scipy and
LightGBM only; no torch, so this stage runs (and is benchmarked) without a training stack.

Vocabulary: a *job* is one (model, seed, fold); a *column* is one (model, seed): its OOF predictions
over all folds cover every CV sample exactly once, and its test prediction is the average of its
fold models' test probabilities.

Leakage: every score called "cv" here is computed on samples whose predictions were made without
their labels. Weighted voting and stacking are fitted on the other folds' OOF rows and scored on the
held-out fold, using the SAME fold ids as the base models; only the final test-time weights /
meta-learner are fitted on all OOF rows.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
from scipy.optimize import minimize

from distrain.metrics import score, score_labels


class EnsembleError(ValueError):
    """Predictions that cannot be ensembled; the message names the job or column."""


@dataclass
class OOFStore:
    """All jobs' predictions, aligned: OOF [columns, cv samples, classes], test [columns, test samples, classes]."""

    sample_ids: list[str]                 # CV samples, sorted
    labels: np.ndarray                    # [n]
    folds: np.ndarray                     # [n] fold id of each CV sample (the fold manifest)
    columns: list[str]                    # "<model>-s<seed>"
    oof: np.ndarray                       # [M, n, C]
    test_ids: list[str] = field(default_factory=list)
    test_labels: Optional[np.ndarray] = None   # [n_test]
    test: Optional[np.ndarray] = None          # [M, n_test, C] fold-averaged per column
    jobs: list[dict] = field(default_factory=list)  # id, model, seed, fold, val_score, best_epoch (included jobs)
    left_out: list[dict] = field(default_factory=list)  # jobs left out with --allow-partial, and why

    @property
    def num_classes(self) -> int:
        return self.oof.shape[2]


@dataclass
class JobPredictions:
    """One finished job's predictions, as read from its directory."""

    id: str
    model: str
    seed: int
    fold: int
    val_score: float
    oof_ids: list[str]
    oof_probs: np.ndarray
    test_ids: list[str]
    test_probs: Optional[np.ndarray]
    test_labels: Optional[np.ndarray]
    best_epoch: int = -1


def build_store(jobs: list[JobPredictions], missing_jobs: list[dict], fold_of_sample: dict[str, int],
                labels_of_sample: dict[str, int], allow_partial: bool = False) -> OOFStore:
    """Align jobs into an OOFStore, checking that every CV sample has exactly one OOF prediction per column.

    A job whose OOF rows do not match its fold (or a job that never finished, in `missing_jobs`) is an
    EnsembleError naming it; with allow_partial its whole column is left out and listed instead.
    Jobs with different class counts are always refused.
    """
    class_counts = {j.oof_probs.shape[1] for j in jobs}
    if len(class_counts) > 1:
        by = {}
        for j in jobs:
            by.setdefault(j.oof_probs.shape[1], j.id)
        raise EnsembleError("jobs have different class counts: " + ", ".join(f"{jid} has {c}" for c, jid in by.items()))
    ids = sorted(fold_of_sample)
    pos = {s: i for i, s in enumerate(ids)}
    n_folds = max(fold_of_sample.values()) + 1
    members = {f: {s for s, ff in fold_of_sample.items() if ff == f} for f in range(n_folds)}

    problems: dict[str, list[str]] = {}  # column -> reasons
    columns: dict[str, list[JobPredictions]] = {}
    for j in jobs:
        col = f"{j.model}-s{j.seed}"
        columns.setdefault(col, []).append(j)
        got, want = set(j.oof_ids), members[j.fold]
        if len(j.oof_ids) != len(got) or got != want:
            missing = sorted(want - got)
            problems.setdefault(col, []).append(
                f"job {j.id}: OOF has {len(got & want)} of {len(want)} rows of fold {j.fold}"
                + (f" (missing e.g. {missing[0]!r})" if missing else "")
                + (f", {len(got - want)} rows from other folds" if got - want else "")
                + (f", {len(j.oof_ids) - len(got)} duplicates" if len(j.oof_ids) != len(got) else ""))
    for m in missing_jobs:
        problems.setdefault(f"{m['model']}-s{m['seed']}", []).append(f"job {m['id']}: not finished (no OOF)")
    for col, js in columns.items():
        folds_seen = sorted(j.fold for j in js)
        if folds_seen != sorted(set(folds_seen)):
            problems.setdefault(col, []).append(f"column {col}: a fold appears twice")
    if problems and not allow_partial:
        first = next(iter(problems.values()))[0]
        raise EnsembleError(f"{first}; every CV sample needs one OOF prediction per (model, seed) "
                            f"(use --allow-partial to leave such columns out)")
    left_out = [{"column": col, "reason": r} for col, rs in problems.items() for r in rs]
    kept = [c for c in columns if c not in problems]
    if not kept:
        raise EnsembleError("no complete (model, seed) column to ensemble")

    n, c = len(ids), class_counts.pop()
    oof = np.full((len(kept), n, c), np.nan, dtype=np.float32)
    test_ids = next((j.test_ids for j in jobs if j.test_probs is not None), [])
    test = np.zeros((len(kept), len(test_ids), c), dtype=np.float32) if test_ids else None
    test_labels = next((j.test_labels for j in jobs if j.test_labels is not None), None)
    included = []
    for k, col in enumerate(kept):
        for j in sorted(columns[col], key=lambda j: j.fold):
            oof[k, [pos[s] for s in j.oof_ids]] = j.oof_probs
            included.append({"id": j.id, "model": j.model, "seed": j.seed, "fold": j.fold, "val_score": j.val_score,
                             "best_epoch": j.best_epoch})
            if test is not None:
                if j.test_ids != test_ids or j.test_probs is None:
                    raise EnsembleError(f"job {j.id}: test predictions cover other samples than the other jobs")
                test[k] += j.test_probs / len(columns[col])
    if np.isnan(oof).any():  # cannot happen after the checks above; a guard against silent NaNs
        raise EnsembleError("OOF table has holes after alignment")
    return OOFStore(sample_ids=ids, labels=np.asarray([labels_of_sample[s] for s in ids]),
                    folds=np.asarray([fold_of_sample[s] for s in ids]), columns=kept, oof=oof,
                    test_ids=list(test_ids), test_labels=test_labels, test=test, jobs=included, left_out=left_out)


def long_table(store: OOFStore):
    """The store as one long table keyed by (sample_id, model, seed, fold): split, label, p0..p{C-1}."""
    import pandas as pd

    frames = []
    for k, col in enumerate(store.columns):
        model, seed = col.rsplit("-s", 1)
        df = pd.DataFrame(store.oof[k], columns=[f"p{i}" for i in range(store.num_classes)])
        df.insert(0, "label", store.labels)
        df.insert(0, "fold", store.folds)
        df.insert(0, "seed", int(seed))
        df.insert(0, "model", model)
        df.insert(0, "sample_id", store.sample_ids)
        df.insert(1, "split", "oof")
        frames.append(df)
        if store.test is not None:
            t = pd.DataFrame(store.test[k], columns=[f"p{i}" for i in range(store.num_classes)])
            t.insert(0, "label", store.test_labels)
            t.insert(0, "fold", -1)  # fold-averaged
            t.insert(0, "seed", int(seed))
            t.insert(0, "model", model)
            t.insert(0, "sample_id", store.test_ids)
            t.insert(1, "split", "test")
            frames.append(t)
    return pd.concat(frames, ignore_index=True)


# ----------------------------------------------------------------------------- voting

def soft_vote(probs: np.ndarray, weights: Optional[np.ndarray] = None) -> np.ndarray:
    """Mean (or weighted mean) of probabilities over the first axis: [M, n, C] -> [n, C]."""
    if weights is None:
        return probs.mean(axis=0)
    return np.tensordot(weights, probs, axes=1)


def hard_vote(probs: np.ndarray) -> np.ndarray:
    """Majority vote of each member's argmax; ties broken by the summed probability. Returns labels [n]."""
    m, n, c = probs.shape
    votes = np.zeros((n, c))
    np.add.at(votes, (np.tile(np.arange(n), m), probs.argmax(axis=2).ravel()), 1)
    summed = probs.sum(axis=0)
    # votes dominate; summed probability (< m, scaled below 1) only orders classes with equal votes
    return (votes + summed / (m + 1)).argmax(axis=1)


def fit_vote_weights(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Non-negative weights summing to 1 that minimise the log loss of the weighted mean (SLSQP)."""
    m = probs.shape[0]
    p_true = probs[:, np.arange(len(labels)), labels].astype(np.float64)  # [M, n]

    def loss_and_grad(w):
        mix = np.clip(w @ p_true, 1e-12, None)
        return -np.log(mix).mean(), -(p_true / mix).mean(axis=1)

    w0 = np.full(m, 1.0 / m)
    res = minimize(loss_and_grad, w0, jac=True, method="SLSQP", bounds=[(0.0, 1.0)] * m,
                   constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1.0, "jac": lambda w: np.ones(m)}],
                   options={"maxiter": 200, "ftol": 1e-10})
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


# ----------------------------------------------------------------------------- stacking

@dataclass
class StackingResult:
    oof_probs: np.ndarray            # [n, C] meta-predictions, each from a meta-model that never saw its fold
    test_probs: Optional[np.ndarray]  # [n_test, C]: mean of the K fold meta-models' predictions
    best_iterations: list[int]
    booster_texts: list[str]         # the K fold meta-models (for the pyfunc model)


def stacking_features(probs: np.ndarray) -> np.ndarray:
    """[M, n, C] -> [n, M*C]: every base column's class probabilities side by side."""
    m, n, c = probs.shape
    return probs.transpose(1, 0, 2).reshape(n, m * c)


def lgbm_params(num_classes: int, seed: int, learning_rate: float, num_leaves: int, threads: int = 0) -> dict:
    """Deterministic LightGBM parameters for the meta-learner. Bagging and feature fractions of 0.5 halve
    the cost of a boosting round (which grows with rows x columns x classes) at no loss seen in tests."""
    params = {"objective": "multiclass" if num_classes > 2 else "binary", "learning_rate": learning_rate,
              "num_leaves": num_leaves, "min_data_in_leaf": 20, "lambda_l2": 1.0, "feature_fraction": 0.5,
              "bagging_fraction": 0.5, "bagging_freq": 1, "max_bin": 63, "seed": seed, "deterministic": True,
              "force_row_wise": True, "feature_pre_filter": False, "verbosity": -1, "num_threads": threads}
    if num_classes > 2:
        params["num_class"] = num_classes
    return params


def _predict_proba(booster, x: np.ndarray, num_classes: int) -> np.ndarray:
    p = booster.predict(x)
    return np.stack([1 - p, p], axis=1) if num_classes == 2 else p


def predict_stacked(boosters: list, x: np.ndarray, num_classes: int) -> np.ndarray:
    """Mean probability of several meta-models (the K fold models at test time)."""
    return np.mean([_predict_proba(b, x, num_classes) for b in boosters], axis=0)


def _capped(rows: np.ndarray, cap: int, rng: np.random.Generator) -> np.ndarray:
    """At most `cap` of the given row indices, drawn without replacement, in ascending order."""
    if cap <= 0 or len(rows) <= cap:
        return rows
    return np.sort(rng.choice(rows, size=cap, replace=False))


def stack(store: OOFStore, *, seed: int = 0, learning_rate: float = 0.1, num_leaves: int = 15,
          max_rounds: int = 100, early_stopping: int = 10, max_meta_rows: int = 15000) -> StackingResult:
    """LightGBM over all columns' OOF probabilities, cross-validated on the base models' fold ids.

    For held-out fold k the meta-model fits on rows of the other folds except fold (k+1) mod K, early-stops
    on fold (k+1) mod K (with K = 2: on a random fifth of the other fold), and predicts fold k; no row of fold k is ever used to fit or stop it. Each fit
    uses at most `max_meta_rows` rows (a fixed random subset), which bounds the time on large data sets.
    Test probabilities are the mean of the K fold meta-models on the fold-averaged base test probabilities.
    """
    import lightgbm as lgb

    x, y, folds = stacking_features(store.oof), store.labels, store.folds
    c = store.num_classes
    params = lgbm_params(c, seed, learning_rate, num_leaves)
    full = lgb.Dataset(x, y, params=params, free_raw_data=False).construct()  # bin once, subset per fold
    rng = np.random.default_rng(seed)
    fold_ids = sorted(set(folds.tolist()))
    meta_oof = np.zeros((len(y), c))
    boosters, best = [], []
    for k in fold_ids:
        if len(fold_ids) >= 3:
            stop_fold = fold_ids[(fold_ids.index(k) + 1) % len(fold_ids)]
            fit_rows = np.flatnonzero((folds != k) & (folds != stop_fold))
            stop_rows = np.flatnonzero(folds == stop_fold)
        else:  # 2 folds: no third fold to stop on; hold out a fifth of the other fold's rows instead
            other = rng.permutation(np.flatnonzero(folds != k))
            stop_rows, fit_rows = np.sort(other[:len(other) // 5]), np.sort(other[len(other) // 5:])
        fit_rows = _capped(fit_rows, max_meta_rows, rng)
        stop_rows = _capped(stop_rows, max(100, max_meta_rows // 2), rng)
        held = folds == k
        booster = lgb.train(params, full.subset(fit_rows), num_boost_round=max_rounds,
                            valid_sets=[full.subset(stop_rows)],
                            callbacks=[lgb.early_stopping(early_stopping, verbose=False)])
        best.append(booster.best_iteration or max_rounds)
        meta_oof[held] = _predict_proba(booster, x[held], c)
        boosters.append(booster)
    test = predict_stacked(boosters, stacking_features(store.test), c) if store.test is not None else None
    return StackingResult(oof_probs=meta_oof, test_probs=test, best_iterations=best,
                          booster_texts=[b.model_to_string(num_iteration=b.best_iteration or -1) for b in boosters])


def naive_stack_score(store: OOFStore, metric: str, *, seed: int = 0, rounds: int = 100) -> float:
    """The mistake stacking must not make: fit the meta-learner on all OOF rows and score it on the same
    rows. Kept only to show, in tests, how far above chance that leaks."""
    import lightgbm as lgb

    x = stacking_features(store.oof)
    booster = lgb.train(lgbm_params(store.num_classes, seed, 0.1, 31), lgb.Dataset(x, store.labels),
                        num_boost_round=rounds)
    return score(metric, store.labels, _predict_proba(booster, x, store.num_classes))


# ----------------------------------------------------------------------------- all together

@dataclass
class EnsembleOutcome:
    scores: dict[str, dict[str, Optional[float]]]   # name -> {"cv": float, "test": float | None}
    base: dict                                      # per-job, per-column, per-model summaries
    weights: dict[str, float]                       # weighted-vote weights per column (test-time)
    oof_predictions: dict[str, np.ndarray]          # name -> [n] predicted labels on OOF (for plots)
    stacking: Optional[StackingResult]
    vote_k: int
    vote_n_oof: int
    vote_n_test: int
    skipped: dict[str, str] = field(default_factory=dict)  # ensemble name -> why it was not built


def run_ensembles(store: OOFStore, metric: str, *, test_by_job: Optional[np.ndarray] = None,
                  vote_fraction: float = 0.6, vote_threshold: float = 0.5, stacking: bool = True,
                  seed: int = 0, learning_rate: float = 0.1, num_leaves: int = 15, max_rounds: int = 100,
                  early_stopping: int = 10, max_meta_rows: int = 15000) -> EnsembleOutcome:
    """Base summaries, the voting variants and stacking, each with a leakage-free CV score and a test score.

    test_by_job [J, n_test, C]: each fold model's own test probabilities, the voters of k-of-n voting on
    test (on OOF the voters are the columns, since each sample has one fold model per column).
    """
    y, yt = store.labels, store.test_labels
    has_test = store.test is not None and yt is not None

    def test_score(p: Optional[np.ndarray]) -> Optional[float]:
        return score(metric, yt, p) if has_test and p is not None else None

    col_cv = [score(metric, y, store.oof[k]) for k in range(len(store.columns))]
    col_test = [test_score(store.test[k]) if has_test else None for k in range(len(store.columns))]
    models = sorted({c.rsplit("-s", 1)[0] for c in store.columns})
    per_model = {}
    for m in models:
        idx = [k for k, c in enumerate(store.columns) if c.rsplit("-s", 1)[0] == m]
        per_model[m] = {"seeds": len(idx), "cv": score(metric, y, store.oof[idx].mean(0)),
                        "test": test_score(store.test[idx].mean(0)) if has_test else None}
    base = {"jobs": {j["id"]: j["val_score"] for j in store.jobs},
            "columns": {c: {"cv": col_cv[k], "test": col_test[k]} for k, c in enumerate(store.columns)},
            "seed_averaged_models": per_model}

    scores: dict[str, dict[str, Optional[float]]] = {}
    preds: dict[str, np.ndarray] = {}
    best_k = int(np.argmax(col_cv))
    scores["best_single"] = {"cv": col_cv[best_k], "test": col_test[best_k], "column": store.columns[best_k]}
    scores["mean_single"] = {"cv": float(np.mean(col_cv)),
                             "test": float(np.mean(col_test)) if has_test else None}
    preds["best_single"] = store.oof[best_k].argmax(1)
    job_scores = [j["val_score"] for j in store.jobs]
    fold_avg_test = test_by_job.mean(0) if test_by_job is not None else (store.test.mean(0) if has_test else None)
    scores["fold_average"] = {"cv": float(np.mean(job_scores)), "test": test_score(fold_avg_test)}

    soft_oof = soft_vote(store.oof)
    scores["soft_vote"] = {"cv": score(metric, y, soft_oof), "test": test_score(soft_vote(store.test) if has_test else None)}
    preds["soft_vote"] = soft_oof.argmax(1)

    hard_oof = hard_vote(store.oof)
    scores["hard_vote"] = {"cv": score_labels(metric, y, hard_oof),
                           "test": score_labels(metric, yt, hard_vote(store.test)) if has_test else None}
    preds["hard_vote"] = hard_oof

    # Weighted voting and stacking are fitted, for each held-out fold, on the other folds' OOF rows. With
    # one trained fold (cv.only_folds=[k]) there are no other rows: they are skipped (and said so), not
    # fitted on the rows they are scored on.
    fold_ids = sorted(set(store.folds.tolist()))
    skipped: dict[str, str] = {}
    if len(fold_ids) >= 2:
        weighted_oof = np.zeros_like(soft_oof)
        for k in fold_ids:
            held = store.folds == k
            w = fit_vote_weights(store.oof[:, ~held], y[~held])
            weighted_oof[held] = soft_vote(store.oof[:, held], w)
        weights = fit_vote_weights(store.oof, y)
        scores["weighted_vote"] = {"cv": score(metric, y, weighted_oof),
                                   "test": test_score(soft_vote(store.test, weights) if has_test else None)}
        preds["weighted_vote"] = weighted_oof.argmax(1)
    else:
        weights = np.full(len(store.columns), 1.0 / len(store.columns))
        reason = f"needs OOF rows of at least 2 folds; only fold {fold_ids[0]} was trained"
        skipped["weighted_vote"] = reason
        if stacking:
            skipped["stacking"] = reason

    m_oof = store.oof.shape[0]
    k_oof = max(1, math.ceil(vote_fraction * m_oof))
    kofn_oof = detections_to_labels(k_of_n_vote(store.oof, k_oof, vote_threshold), soft_oof)
    voters_test = test_by_job if test_by_job is not None else store.test
    n_test_voters = voters_test.shape[0] if voters_test is not None else 0
    k_test = max(1, math.ceil(vote_fraction * n_test_voters))
    scores["k_of_n_vote"] = {
        "cv": score_labels(metric, y, kofn_oof),
        "test": score_labels(metric, yt, detections_to_labels(k_of_n_vote(voters_test, k_test, vote_threshold),
                                                              voters_test.mean(0))) if has_test else None}
    preds["k_of_n_vote"] = kofn_oof

    stacked = None
    if stacking and "stacking" not in skipped:
        stacked = stack(store, seed=seed, learning_rate=learning_rate, num_leaves=num_leaves,
                        max_rounds=max_rounds, early_stopping=early_stopping, max_meta_rows=max_meta_rows)
        scores["stacking"] = {"cv": score(metric, y, stacked.oof_probs), "test": test_score(stacked.test_probs)}
        preds["stacking"] = stacked.oof_probs.argmax(1)
    return EnsembleOutcome(scores=scores, base=base, weights=dict(zip(store.columns, map(float, weights)) ),
                           oof_predictions=preds, stacking=stacked, vote_k=k_oof, vote_n_oof=m_oof,
                           vote_n_test=n_test_voters, skipped=skipped)
