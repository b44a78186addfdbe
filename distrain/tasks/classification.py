"""Image classification: one class of C (`multiclass`), a positive class against the rest (`binary`), or any set
of L labels (`multilabel`).

A *binary* task is a two-class task whose decision is `p(positive) >= threshold` (0.5 unless thresholds are tuned
on the OOF predictions); everything else about it (a 2-logit head, [n, 2] probabilities, the ensembles) is the
multiclass machinery with two classes. A *multilabel* task gives each image any subset of its labels (none
included): one sigmoid per label, [n, L] independent probabilities, labels as [n, L] 0/1 rows, each label decided
by `p >= its threshold` (0.5, or one per label tuned on the OOF predictions).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from distrain.errors import DataError
from distrain.tasks.base import Label, LossSettings, MetaTarget, Task
from distrain.tasks.metrics import METRICS, Threshold, score_labels

if TYPE_CHECKING:
    import torch

DIGITS_POSITIVE = 8
"""The positive class of the binary digits demo (`data.source: digits_binary`): 'is it an 8?', 174 of 1,797
images (9.7%), and the digit most confused with others (3, 5, 9, 1)."""

DIGIT_PROPERTIES = {"even": (0, 2, 4, 6, 8), "large": (5, 6, 7, 8, 9), "loop": (0, 6, 8, 9), "prime": (2, 3, 5, 7)}
"""The labels of the multilabel digits demo (`data.source: digits_multilabel`): each image has the properties
of its digit (a 1 has none, an 8 three)."""

THRESHOLD_GRID = np.round(np.arange(0.01, 1.0, 0.01), 2)
THRESHOLD_GRID = THRESHOLD_GRID[np.argsort(np.abs(THRESHOLD_GRID - 0.5), kind="stable")]
"""Thresholds tried when tuning, nearest 0.5 first (so that ties go to the one nearest 0.5)."""


def label_set_strata(rows: np.ndarray, min_count: int) -> np.ndarray:
    """One stratum per sample of 0/1 label rows [n, L]: its rarest label (L when it has none), so that stratifying
    on it spreads every label's positives over the folds, the rare labels' first. Strata with fewer than
    `min_count` samples are pooled into one (joined to the largest stratum if the pool is still too small)."""
    n_labels = rows.shape[1]
    rarity = np.where(rows > 0, rows.sum(axis=0)[None, :], np.iinfo(np.int64).max)
    strata = np.where(rows.any(axis=1), rarity.argmin(axis=1), n_labels)
    pooled = np.bincount(strata, minlength=n_labels + 1)[strata] < min_count
    strata[pooled] = n_labels + 1
    if 0 < pooled.sum() < min_count and not pooled.all():
        strata[pooled] = np.bincount(strata[~pooled]).argmax()
    return strata


class OneOfClasses(Task):
    """One class per sample: a softmax over C logits, [n, C] probabilities, class indices [n]."""

    argmax_decisions = True

    def hard_vote(self, probs: np.ndarray) -> np.ndarray:
        """Majority vote of each member's argmax; ties broken by the summed probability. Returns labels [n]."""
        m, n, c = probs.shape
        votes = np.zeros((n, c))
        np.add.at(votes, (np.tile(np.arange(n), m), probs.argmax(axis=2).ravel()), 1)
        summed = probs.sum(axis=0)
        # votes dominate; summed probability (< m, scaled below 1) only orders classes with equal votes
        return (votes + summed / (m + 1)).argmax(axis=1)

    def k_of_n_decisions(self, detected: np.ndarray, mean_probs: np.ndarray) -> np.ndarray:
        """The detected class with the highest mean probability; where nothing reaches k votes, the argmax."""
        masked = np.where(detected, mean_probs, -1.0)
        return np.where(detected.any(axis=1), masked.argmax(axis=1), mean_probs.argmax(axis=1))

    def true_probabilities(self, probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
        return probs[:, np.arange(len(labels)), labels]

    def meta_targets(self, num_classes: int) -> list[MetaTarget]:
        return [MetaTarget(num_classes)]

    def activate(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.softmax(dim=1)

    def batch_correct(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return (logits.argmax(1) == labels).sum()

    def distillation_loss(self, logits: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
        from distrain.tasks.losses import softmax_distillation

        return softmax_distillation(logits, teacher, temperature)

    def validation_loss(self, probs: np.ndarray, labels: np.ndarray) -> float:
        """Cross-entropy of the probabilities."""
        import torch
        import torch.nn.functional as F

        p, y = torch.from_numpy(probs), torch.from_numpy(labels)
        return float(F.nll_loss(torch.log(p.clamp_min(1e-12)), y))

    def create_loss(self, settings: LossSettings) -> torch.nn.Module:
        from distrain.tasks.losses import BinaryCrossEntropy, CrossEntropy, FocalLoss

        if settings.name == "bce":
            return BinaryCrossEntropy(settings.pos_weight, settings.label_smoothing)
        if settings.name == "focal":
            alpha = settings.focal_alpha if self.weights_positives else 0.0
            weights = [1.0 - alpha, alpha] if alpha else None
            return FocalLoss(settings.focal_gamma, settings.label_smoothing, weights)
        return CrossEntropy(settings.label_smoothing)


class Multiclass(OneOfClasses):
    name = "multiclass"
    description = "one label per image, softmax"
    metrics = ("accuracy", "balanced_accuracy", "f1_macro", "f1_micro", "qwk", "roc_auc", "log_loss")
    losses = ("ce", "focal")
    digits_source = "digits"

    def digits_labels(self, digits: np.ndarray) -> tuple[list[Label], list[str]]:
        return [int(d) for d in digits], [str(c) for c in range(10)]

    def decide(self, probs: np.ndarray, threshold: Threshold = None) -> np.ndarray:
        """The argmax (a multiclass task has no thresholds; one given is ignored)."""
        return probs.argmax(axis=1)


class Binary(OneOfClasses):
    name = "binary"
    description = "data.num_classes 2, label 1 the positive class; threshold on p(positive) tuned on OOF"
    metrics = ("accuracy", "balanced_accuracy", "f1", "f1_macro", "f1_micro", "qwk", "roc_auc",
               "average_precision", "log_loss")  # fmt: skip
    losses = ("ce", "focal", "bce")
    weights_positives = True
    tunes_thresholds = True
    digits_source = "digits_binary"

    def config_problems(self, num_classes: int) -> list[str]:
        return (
            [] if num_classes == 2 else [f"data.num_classes: invalid value {num_classes} (expected 2 for task: binary)"]
        )

    def digits_labels(self, digits: np.ndarray) -> tuple[list[Label], list[str]]:
        return [int(d == DIGITS_POSITIVE) for d in digits], ["other", str(DIGITS_POSITIVE)]

    def decide(self, probs: np.ndarray, threshold: Threshold = None) -> np.ndarray:
        """The argmax, or with `threshold` label 1 where p(positive) >= threshold."""
        if threshold is None:
            return probs.argmax(axis=1)
        return (probs[:, 1] >= threshold).astype(np.int64)

    def tune_threshold(self, metric: str, labels: np.ndarray, probs: np.ndarray) -> float:
        """The threshold on p(positive) that scores `metric` best on these rows (a grid of 0.01 steps; the one
        nearest 0.5 among equals). 0.5 for a probability metric, which thresholds do not change."""
        if METRICS[metric].on_probabilities:
            return 0.5
        scores = [score_labels(metric, labels, (probs[:, 1] >= t).astype(np.int64)) for t in THRESHOLD_GRID]
        sign = 1.0 if METRICS[metric].higher_is_better else -1.0
        return float(THRESHOLD_GRID[int(np.argmax(sign * np.asarray(scores)))])


class Multilabel(Task):
    name = "multilabel"
    description = "any set of data.num_classes labels per image, one sigmoid each; one threshold per label tuned on OOF"
    metrics = ("accuracy", "f1_macro", "f1_micro", "roc_auc", "map", "log_loss")
    losses = ("focal", "bce")
    label_sets = True
    weights_positives = True
    tunes_thresholds = True
    digits_source = "digits_multilabel"

    def digits_labels(self, digits: np.ndarray) -> tuple[list[Label], list[str]]:
        props = list(DIGIT_PROPERTIES.values())
        return [tuple(j for j, members in enumerate(props) if d in members) for d in digits], list(DIGIT_PROPERTIES)

    def strata(self, labels: np.ndarray, min_count: int) -> np.ndarray:
        return label_set_strata(labels, min_count)

    def fold_strata(self, labels: np.ndarray, n_folds: int) -> np.ndarray:
        """`strata`, once every label has a positive sample per fold."""
        positives = labels.sum(axis=0)
        if (positives < n_folds).any():
            rare = int(np.flatnonzero(positives < n_folds)[0])
            raise DataError(f"label {rare} has {positives[rare]} positive samples, fewer than cv.folds={n_folds}")
        return self.strata(labels, n_folds)

    def decide(self, probs: np.ndarray, threshold: Threshold = None) -> np.ndarray:
        """[n, L] 0/1: each label where p >= its threshold (0.5 when None)."""
        return (probs >= np.asarray(0.5 if threshold is None else threshold, dtype=np.float64)).astype(np.int64)

    def hard_vote(self, probs: np.ndarray) -> np.ndarray:
        """Per label, the majority of the members' decisions (p >= 0.5), a tie decided by the mean probability."""
        m = probs.shape[0]
        votes = 2 * (probs >= 0.5).sum(axis=0)
        return np.where(votes == m, probs.mean(axis=0) >= 0.5, votes > m).astype(np.int64)

    def k_of_n_decisions(self, detected: np.ndarray, mean_probs: np.ndarray) -> np.ndarray:
        """The detections are the decisions."""
        return detected.astype(np.int64)

    def true_probabilities(self, probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """The likelihood of each 0/1 label: [M, n*L]."""
        return np.where(labels[None] == 1, probs, 1.0 - probs).reshape(probs.shape[0], -1)

    def tune_threshold(self, metric: str, labels: np.ndarray, probs: np.ndarray) -> list[float]:
        """One threshold per label, each maximising that label's own F1 (for f1_macro, where this is the optimum,
        and f1_micro) or its own accuracy (for exact-match accuracy), on a grid of 0.01 steps (the one nearest 0.5
        among equals). All 0.5 for a probability metric."""
        n_labels = labels.shape[1]
        if METRICS[metric].on_probabilities:
            return [0.5] * n_labels
        best = np.empty(n_labels)
        for j in range(n_labels):
            pred = probs[:, j, None] >= THRESHOLD_GRID[None, :]  # [n, grid]: every threshold's decisions at once
            truth = labels[:, j, None].astype(bool)
            tp, fp, fn = (pred & truth).sum(0), (pred & ~truth).sum(0), (~pred & truth).sum(0)
            if metric == "accuracy":
                per_threshold = 1.0 - (fp + fn) / len(truth)
            else:
                per_threshold = 2 * tp / np.maximum(2 * tp + fp + fn, 1)  # F1, 0 when there is nothing to find
            best[j] = THRESHOLD_GRID[int(np.argmax(per_threshold))]
        return best.tolist()

    def meta_targets(self, num_classes: int) -> list[MetaTarget]:
        """A binary meta-model per label, each on every column's probabilities of every label."""
        return [MetaTarget(2, column=j) for j in range(num_classes)]

    def activate(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.sigmoid()

    def batch_correct(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Samples with every label right (logit > 0)."""
        return ((logits > 0) == labels.bool()).all(dim=1).sum()

    def distillation_loss(self, logits: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
        from distrain.tasks.losses import sigmoid_distillation

        return sigmoid_distillation(logits, teacher, temperature)

    def validation_loss(self, probs: np.ndarray, labels: np.ndarray) -> float:
        """The mean binary cross-entropy over every (sample, label)."""
        import torch
        import torch.nn.functional as F

        p, y = torch.from_numpy(probs), torch.from_numpy(labels)
        return float(F.binary_cross_entropy(p.clamp(1e-7, 1 - 1e-7), y.float()))

    def create_loss(self, settings: LossSettings) -> torch.nn.Module:
        from distrain.tasks.losses import LabelSetLoss

        gamma = settings.focal_gamma if settings.name == "focal" else None
        return LabelSetLoss(settings.label_smoothing, settings.pos_weight, gamma, settings.focal_alpha)
