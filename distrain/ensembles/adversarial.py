"""The classifier of adversarial validation (`distrain adversarial`, `distrain.serving.adversarial`): how well two
sets of embeddings can be told apart, cross-validated. Torch-free."""

from __future__ import annotations

import numpy as np

FOLDS = 5
REPEATS = 2


def adversarial_auc(train: np.ndarray, other: np.ndarray) -> tuple[float, float, np.ndarray]:
    """(out-of-fold ROC AUC, the standard deviation of the per-fold AUCs, the out-of-fold p(other) of the `train`
    rows) of a LightGBM classifier telling `other` rows (label 1) from `train` rows (label 0), over `REPEATS`
    shuffles of `FOLDS` stratified folds (AUC and p averaged). Why a large model: cross-validated AUC is biased
    below 0.5 when the sets are alike, the more the more local the classifier (a held-out image's neighbourhood
    lacks one image of its own set): measured on the digits' holdout (5 shuffles each), 0.44 with 3-leaf trees,
    0.47 with a logistic regression, 0.50-0.51 with 31-leaf trees."""
    import lightgbm as lgb
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold

    x = np.concatenate([train, other])
    y = np.concatenate([np.zeros(len(train)), np.ones(len(other))])
    aucs, per_fold, p_sum = [], [], np.zeros(len(y))
    for repeat in range(REPEATS):
        p = np.zeros(len(y))
        for fit_idx, held in StratifiedKFold(FOLDS, shuffle=True, random_state=repeat).split(x, y):
            model = lgb.LGBMClassifier(n_estimators=150, learning_rate=0.1, num_leaves=31, min_child_samples=5,
                                       random_state=repeat, verbose=-1)  # fmt: skip
            p[held] = model.fit(x[fit_idx], y[fit_idx]).predict_proba(x[held])[:, 1]
            per_fold.append(roc_auc_score(y[held], p[held]))
        aucs.append(roc_auc_score(y, p))
        p_sum += p
    return float(np.mean(aucs)), float(np.std(per_fold)), p_sum[: len(train)] / REPEATS
