"""LightGBM stacking over the columns' OOF probabilities, cross-validated on the base models' fold ids; the task
says what the meta-models learn (`Task.meta_targets`: the class, or a binary target per label).

Leakage: the meta-model that predicts fold k never saw a row of fold k, neither to fit nor to stop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from distrain.config import EnsembleConfig
from distrain.ensembles.store import OOFStore
from distrain.tasks import MetaTarget, Task


@dataclass
class StackingResult:
    oof_probs: np.ndarray  # [n, C] meta-predictions, each from a meta-model that never saw its fold
    test_probs: Optional[np.ndarray]  # [n_test, C]: mean of the K fold meta-models' predictions
    best_iterations: list[int]
    booster_texts: list[str]  # the K fold meta-models of each meta target, target-major (for the pyfunc)


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


def load_boosters(texts: list[str]) -> list:
    """LightGBM meta-models from their saved text (`StackingResult.booster_texts`), for serving."""
    import lightgbm as lgb

    return [lgb.Booster(model_str=text) for text in texts]


def predict_stacked(boosters: list, x: np.ndarray, targets: list[MetaTarget], num_classes: int) -> np.ndarray:
    """[n, num_classes]: per meta target, the mean probability of its K fold meta-models (`boosters` holds each
    target's K in turn, target-major), placed in the output columns the target fills."""
    out = np.zeros((len(x), num_classes))
    for target, idx in zip(targets, np.array_split(np.arange(len(boosters)), len(targets))):
        _place(out, slice(None), target, np.mean([predict_proba(boosters[i], x, target.classes) for i in idx], axis=0))
    return out


def _place(out: np.ndarray, rows, target: MetaTarget, probs: np.ndarray) -> None:
    """A meta-model's probabilities into the output: every column, or p(1) into the target's column."""
    if target.column is None:
        out[rows] = probs
    else:
        out[rows, target.column] = probs[:, 1]


def _capped(rows: np.ndarray, cap: int, rng: np.random.Generator) -> np.ndarray:
    """At most `cap` of the given row indices, drawn without replacement, in ascending order."""
    if cap <= 0 or len(rows) <= cap:
        return rows
    return np.sort(rng.choice(rows, size=cap, replace=False))


def meta_splits(
    folds: np.ndarray, max_meta_rows: int, rng: np.random.Generator
) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """(held-out fold k, rows to fit on, rows to early-stop on) per fold: fit on the other folds except
    (k+1) mod K and stop on (k+1) mod K (with K = 2: on a random fifth of the other fold), each capped at
    `max_meta_rows` (stopping at half that, at least 100): no row of fold k is ever used."""
    fold_ids = sorted(set(folds.tolist()))
    splits = []
    for k in fold_ids:
        if len(fold_ids) >= 3:
            stop_fold = fold_ids[(fold_ids.index(k) + 1) % len(fold_ids)]
            fit_rows = np.flatnonzero((folds != k) & (folds != stop_fold))
            stop_rows = np.flatnonzero(folds == stop_fold)
        else:  # 2 folds: no third fold to stop on; hold out a fifth of the other fold's rows instead
            other = rng.permutation(np.flatnonzero(folds != k))
            stop_rows, fit_rows = np.sort(other[: len(other) // 5]), np.sort(other[len(other) // 5 :])
        splits.append((k, _capped(fit_rows, max_meta_rows, rng), _capped(stop_rows, max(100, max_meta_rows // 2), rng)))
    return splits


def stack(store: OOFStore, ec: EnsembleConfig, task: Task, seed: int = 0) -> StackingResult:
    """LightGBM over all columns' OOF probabilities, cross-validated on the base models' fold ids
    (`meta_splits`: no row of the held-out fold is used to fit or stop its meta-model), one meta-model per fold
    for each of the task's meta targets (each on every column's probabilities).
    Test probabilities are the mean of the K fold meta-models on the fold-averaged base test probabilities.
    `ec` gives LightGBM's learning rate, leaves, rounds, early stopping and the meta rows cap.
    """
    import lightgbm as lgb

    x, folds, c = stacking_features(store.oof), store.folds, store.num_classes
    targets = task.meta_targets(c)
    splits = meta_splits(folds, ec.max_meta_rows, np.random.default_rng(seed))
    meta_oof = np.zeros((len(folds), c))
    boosters, best = [], []
    for target in targets:
        params = lgbm_params(target.classes, seed, ec.learning_rate, ec.num_leaves)
        y = target.labels(store.labels)
        full = lgb.Dataset(x, y, params=params, free_raw_data=False).construct()  # bin once, subset per fold
        for k, fit_rows, stop_rows in splits:
            booster = lgb.train(params, full.subset(fit_rows), num_boost_round=ec.max_rounds,
                                valid_sets=[full.subset(stop_rows)],
                                callbacks=[lgb.early_stopping(ec.early_stopping, verbose=False)])  # fmt: skip
            best.append(booster.best_iteration or ec.max_rounds)
            held = folds == k
            _place(meta_oof, held, target, predict_proba(booster, x[held], target.classes))
            boosters.append(booster)
    test = None
    if store.test is not None:
        test = predict_stacked(boosters, stacking_features(store.test), targets, c)
    return StackingResult(
        oof_probs=meta_oof,
        test_probs=test,
        best_iterations=best,
        booster_texts=[b.model_to_string(num_iteration=b.best_iteration or -1) for b in boosters],
    )
