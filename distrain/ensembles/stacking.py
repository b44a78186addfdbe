"""LightGBM stacking over the columns' OOF probabilities, cross-validated on the base models' fold ids.

Leakage: the meta-model that predicts fold k never saw a row of fold k, neither to fit nor to stop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from distrain.ensembles.store import OOFStore


@dataclass
class StackingResult:
    oof_probs: np.ndarray  # [n, C] meta-predictions, each from a meta-model that never saw its fold
    test_probs: Optional[np.ndarray]  # [n_test, C]: mean of the K fold meta-models' predictions
    best_iterations: list[int]
    booster_texts: list[str]  # the K fold meta-models (for the pyfunc model)


def stacking_features(probs: np.ndarray) -> np.ndarray:
    """[M, n, C] -> [n, M*C]: every base column's class probabilities side by side."""
    m, n, c = probs.shape
    return probs.transpose(1, 0, 2).reshape(n, m * c)


def lgbm_params(num_classes: int, seed: int, learning_rate: float, num_leaves: int, threads: int = 0) -> dict:
    """Deterministic LightGBM parameters for the meta-learner. Bagging and feature fractions of 0.5 halve
    the cost of a boosting round (which grows with rows x columns x classes) at no loss seen in tests."""
    params = {
        "objective": "multiclass" if num_classes > 2 else "binary",
        "learning_rate": learning_rate,
        "num_leaves": num_leaves,
        "min_data_in_leaf": 20,
        "lambda_l2": 1.0,
        "feature_fraction": 0.5,
        "bagging_fraction": 0.5,
        "bagging_freq": 1,
        "max_bin": 63,
        "seed": seed,
        "deterministic": True,
        "force_row_wise": True,
        "feature_pre_filter": False,
        "verbosity": -1,
        "num_threads": threads,
    }
    if num_classes > 2:
        params["num_class"] = num_classes
    return params


def predict_proba(booster, x: np.ndarray, num_classes: int) -> np.ndarray:
    p = booster.predict(x)
    return np.stack([1 - p, p], axis=1) if num_classes == 2 else p


def predict_stacked(boosters: list, x: np.ndarray, num_classes: int) -> np.ndarray:
    """Mean probability of several meta-models (the K fold models at test time)."""
    return np.mean([predict_proba(b, x, num_classes) for b in boosters], axis=0)


def _capped(rows: np.ndarray, cap: int, rng: np.random.Generator) -> np.ndarray:
    """At most `cap` of the given row indices, drawn without replacement, in ascending order."""
    if cap <= 0 or len(rows) <= cap:
        return rows
    return np.sort(rng.choice(rows, size=cap, replace=False))


def stack(
    store: OOFStore,
    *,
    seed: int = 0,
    learning_rate: float = 0.1,
    num_leaves: int = 15,
    max_rounds: int = 100,
    early_stopping: int = 10,
    max_meta_rows: int = 15000,
) -> StackingResult:
    """LightGBM over all columns' OOF probabilities, cross-validated on the base models' fold ids.

    For held-out fold k the meta-model fits on rows of the other folds except fold (k+1) mod K, early-stops
    on fold (k+1) mod K (with K = 2: on a random fifth of the other fold), and predicts fold k; no row of
    fold k is ever used to fit or stop it. Each fit uses at most `max_meta_rows` rows (a fixed random
    subset), which bounds the time on large data sets.
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
            stop_rows, fit_rows = np.sort(other[: len(other) // 5]), np.sort(other[len(other) // 5 :])
        fit_rows = _capped(fit_rows, max_meta_rows, rng)
        stop_rows = _capped(stop_rows, max(100, max_meta_rows // 2), rng)
        held = folds == k
        booster = lgb.train(
            params,
            full.subset(fit_rows),
            num_boost_round=max_rounds,
            valid_sets=[full.subset(stop_rows)],
            callbacks=[lgb.early_stopping(early_stopping, verbose=False)],
        )
        best.append(booster.best_iteration or max_rounds)
        meta_oof[held] = predict_proba(booster, x[held], c)
        boosters.append(booster)
    test = predict_stacked(boosters, stacking_features(store.test), c) if store.test is not None else None
    return StackingResult(
        oof_probs=meta_oof,
        test_probs=test,
        best_iterations=best,
        booster_texts=[b.model_to_string(num_iteration=b.best_iteration or -1) for b in boosters],
    )
