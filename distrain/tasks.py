"""What each task type allows: its metrics (with their direction) and its losses. Plain Python, no numpy:
the config checks against these tables before any work starts, and `distrain.study.metrics` scores by them.

A *binary* task is a two-class task whose decision is `p(positive) >= threshold` (0.5 unless thresholds are
tuned on the OOF predictions); everything else about it (a 2-logit head, [n, 2] probabilities, the ensembles)
is the multiclass machinery with two classes.

A *multilabel* task gives each image any subset of data.num_classes labels (none included): one sigmoid per
label, [n, L] independent probabilities, labels as [n, L] 0/1 rows, and each label decided by
`p >= its threshold` (0.5, or one per label tuned on the OOF predictions).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

TASKS = ("multiclass", "binary", "multilabel")
SINGLE_LABEL = ("multiclass", "binary")


@dataclass(frozen=True)
class MetricSpec:
    higher_is_better: bool
    on_probabilities: bool
    """Scored on the probabilities themselves (threshold-free); else on the decisions (argmax / thresholds)."""
    tasks: tuple[str, ...]
    meaning: str


METRICS: dict[str, MetricSpec] = {
    "accuracy": MetricSpec(True, False, TASKS, "fraction of samples whose decision is right (multilabel: all labels)"),
    "balanced_accuracy": MetricSpec(True, False, SINGLE_LABEL, "mean recall over classes"),
    "f1": MetricSpec(True, False, ("binary",), "F1 of the positive class (label 1)"),
    "f1_macro": MetricSpec(True, False, TASKS, "unweighted mean of the per-class (per-label) F1"),
    "f1_micro": MetricSpec(True, False, TASKS, "F1 over all decisions pooled"),
    "qwk": MetricSpec(True, False, SINGLE_LABEL, "quadratic weighted Cohen's kappa (ordinal labels)"),
    "roc_auc": MetricSpec(True, True, TASKS, "ROC AUC (binary: of p(positive); else one-vs-rest / per label, macro)"),
    "average_precision": MetricSpec(True, True, ("binary",), "area under the precision-recall curve of p(positive)"),
    "map": MetricSpec(True, True, ("multilabel",), "mean over labels of the average precision (mAP)"),
    "log_loss": MetricSpec(False, True, TASKS, "cross-entropy of the probabilities (lower is better)"),
}

LOSSES: dict[str, tuple[str, ...]] = {
    "ce": SINGLE_LABEL,  # cross-entropy with label smoothing (soft-target cross-entropy under Mixup / CutMix)
    "focal": TASKS,  # focal loss (softmax, or sigmoid per label for multilabel); gamma 0 is cross-entropy
    "bce": ("binary", "multilabel"),  # binary cross-entropy with logits (per label for multilabel), pos_weight
}


def metric_fits(metric: str, task: str) -> bool:
    return metric in METRICS and task in METRICS[metric].tasks


def metrics_for(task: str) -> list[str]:
    return [m for m, spec in METRICS.items() if task in spec.tasks]


def losses_for(task: str) -> list[str]:
    return [name for name, tasks in LOSSES.items() if task in tasks]


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
