"""Every metric equals scikit-learn's; direction decides best epochs and gaps; thresholds are tuned."""

import math
import warnings

import numpy as np
import pytest
from sklearn import metrics as skm

from distrain.tasks import best_index, get_task, improves, overfit_gap

MC, BINARY, ML = get_task("multiclass"), get_task("binary"), get_task("multilabel")

rng = np.random.default_rng(0)
MULTI_PROBS = rng.dirichlet(np.ones(4), 300)
MULTI_LABELS = np.where(rng.random(300) < 0.6, MULTI_PROBS.argmax(1), rng.integers(0, 4, 300))
BIN_PROBS = rng.dirichlet(np.ones(2), 300)
BIN_LABELS = (rng.random(300) < 0.25 + 0.5 * BIN_PROBS[:, 1]).astype(int)

SKLEARN = {
    "accuracy": lambda y, p: skm.accuracy_score(y, p.argmax(1)),
    "balanced_accuracy": lambda y, p: skm.balanced_accuracy_score(y, p.argmax(1)),
    "f1_macro": lambda y, p: skm.f1_score(y, p.argmax(1), average="macro"),
    "f1_micro": lambda y, p: skm.f1_score(y, p.argmax(1), average="micro"),
    "qwk": lambda y, p: skm.cohen_kappa_score(y, p.argmax(1), weights="quadratic"),
    "log_loss": lambda y, p: skm.log_loss(y, p),
}


@pytest.mark.parametrize("metric", MC.metrics)
def test_multiclass_metrics_equal_scikit_learn(metric):
    expected = (
        skm.roc_auc_score(MULTI_LABELS, MULTI_PROBS, multi_class="ovr", average="macro")
        if metric == "roc_auc"
        else SKLEARN[metric](MULTI_LABELS, MULTI_PROBS)
    )
    assert MC.score(metric, MULTI_LABELS, MULTI_PROBS) == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("metric", BINARY.metrics)
def test_binary_metrics_equal_scikit_learn(metric):
    p1 = BIN_PROBS[:, 1]
    expected = {
        "f1": lambda: skm.f1_score(BIN_LABELS, p1 >= 0.3),
        "roc_auc": lambda: skm.roc_auc_score(BIN_LABELS, p1),
        "average_precision": lambda: skm.average_precision_score(BIN_LABELS, p1),
    }.get(metric)
    if expected is None:  # decision metrics at threshold 0.3
        pred = np.stack([1 - (p1 >= 0.3), p1 >= 0.3], 1).astype(float)
        assert BINARY.score(metric, BIN_LABELS, BIN_PROBS, threshold=0.3) == pytest.approx(
            SKLEARN[metric](BIN_LABELS, pred if metric != "log_loss" else BIN_PROBS), abs=1e-9
        )
    else:
        assert BINARY.score(metric, BIN_LABELS, BIN_PROBS, threshold=0.3) == pytest.approx(expected(), abs=1e-9)


def test_roc_auc_averages_the_classes_present_and_is_nan_with_one():
    present = MULTI_LABELS != 3
    expected = np.mean([skm.roc_auc_score(MULTI_LABELS[present] == c, MULTI_PROBS[present, c]) for c in range(3)])
    assert MC.score("roc_auc", MULTI_LABELS[present], MULTI_PROBS[present]) == pytest.approx(expected)
    assert math.isnan(MC.score("roc_auc", np.zeros(5, int), MULTI_PROBS[:5]))


def test_direction_picks_the_best_and_signs_the_gap():
    assert improves("log_loss", 0.3, 0.4) and not improves("log_loss", 0.5, 0.4)
    assert improves("accuracy", 0.9, 0.8) and not improves("accuracy", 0.7, 0.8)
    assert improves("log_loss", 0.9, math.nan) and improves("accuracy", 0.1, math.nan)
    assert best_index("log_loss", [0.5, 0.2, 0.3]) == 1 and best_index("f1", [0.5, 0.2, 0.7]) == 2
    assert overfit_gap("log_loss", 0.1, 0.3) == pytest.approx(0.2)  # train loss lower: overfitting, positive
    assert overfit_gap("accuracy", 0.95, 0.90) == pytest.approx(0.05)


def test_tuned_threshold_is_the_grid_best_and_decisions_use_it():
    t = BINARY.tune_threshold("f1", BIN_LABELS, BIN_PROBS)
    grid = np.round(np.arange(0.01, 1.0, 0.01), 2)
    best = max(skm.f1_score(BIN_LABELS, BIN_PROBS[:, 1] >= g) for g in grid)
    assert BINARY.score("f1", BIN_LABELS, BIN_PROBS, threshold=t) == pytest.approx(best)
    assert BINARY.score("f1", BIN_LABELS, BIN_PROBS, threshold=t) >= BINARY.score("f1", BIN_LABELS, BIN_PROBS)
    assert BINARY.tune_threshold("roc_auc", BIN_LABELS, BIN_PROBS) == 0.5  # a probability metric has no threshold
    assert (BINARY.decide(BIN_PROBS, 0.2) == (BIN_PROBS[:, 1] >= 0.2)).all()
    assert (MC.decide(MULTI_PROBS) == MULTI_PROBS.argmax(1)).all()


ML_PROBS = rng.random((300, 5))
ML_LABELS = (rng.random((300, 5)) < 0.2 + 0.6 * ML_PROBS).astype(np.int64)  # probabilities carry signal
ML_SKLEARN = {
    "accuracy": lambda y, p: skm.accuracy_score(y, p >= 0.5),  # exact match: every label right
    "f1_macro": lambda y, p: skm.f1_score(y, p >= 0.5, average="macro"),
    "f1_micro": lambda y, p: skm.f1_score(y, p >= 0.5, average="micro"),
    "roc_auc": lambda y, p: skm.roc_auc_score(y, p, average="macro"),
    "map": lambda y, p: skm.average_precision_score(y, p, average="macro"),
    "log_loss": lambda y, p: np.mean([skm.log_loss(y[:, j], p[:, j], labels=[0, 1]) for j in range(y.shape[1])]),
}


@pytest.mark.parametrize("metric", ML.metrics)
def test_multilabel_metrics_equal_scikit_learn(metric):
    assert ML.score(metric, ML_LABELS, ML_PROBS) == pytest.approx(ML_SKLEARN[metric](ML_LABELS, ML_PROBS), abs=1e-9)


def test_multilabel_ranking_metrics_average_the_labels_that_can_be_scored():
    labels = ML_LABELS.copy()
    labels[:, 4] = 0  # no positive: no AP, no AUC for label 4
    expected_map = np.mean([skm.average_precision_score(labels[:, j], ML_PROBS[:, j]) for j in range(4)])
    assert ML.score("map", labels, ML_PROBS) == pytest.approx(expected_map)
    assert ML.score("roc_auc", labels, ML_PROBS) == pytest.approx(skm.roc_auc_score(labels[:, :4], ML_PROBS[:, :4]))
    assert math.isnan(ML.score("map", np.zeros((5, 2), int), ML_PROBS[:5, :2]))


def test_label_thresholds_are_each_labels_grid_best_and_decisions_use_them():
    biased = ML_PROBS * np.array([0.5, 1.0, 1.0, 1.0, 0.3])  # labels 0 and 4 under-confident: tuning must lower them
    t = np.asarray(ML.tune_threshold("f1_macro", ML_LABELS, biased))
    grid = np.round(np.arange(0.01, 1.0, 0.01), 2)
    for j in range(5):
        best = max(skm.f1_score(ML_LABELS[:, j], biased[:, j] >= g) for g in grid)
        assert skm.f1_score(ML_LABELS[:, j], biased[:, j] >= t[j]) == pytest.approx(best)
    assert t[0] < 0.5 and t[4] < 0.5
    assert ML.score("f1_macro", ML_LABELS, biased, threshold=t) > ML.score("f1_macro", ML_LABELS, biased) + 0.05
    assert (ML.decide(biased, t) == (biased >= t)).all()
    assert (ML.decide(biased) == (biased >= 0.5)).all()
    assert (np.asarray(ML.tune_threshold("map", ML_LABELS, biased)) == 0.5).all()  # a probability metric has none


@pytest.mark.parametrize("metric", ["accuracy", "balanced_accuracy", "f1", "f1_macro", "f1_micro", "qwk"])
def test_decision_metrics_from_counts_equal_scikit_learn_classes_missing_included(metric):
    """300 random cases, bit for bit: 2-39 classes, 1-400 rows, skewed so classes go missing from the labels, the
    decisions or both; one class alone; sparse class ids (counted over the ids present); bool / uint8 / int32."""
    from distrain.tasks.metrics import score_labels

    reference = {
        "accuracy": skm.accuracy_score,
        "balanced_accuracy": skm.balanced_accuracy_score,
        "f1": lambda y, p: skm.f1_score(y, p, zero_division=0),
        "f1_macro": lambda y, p: skm.f1_score(y, p, average="macro", zero_division=0),
        "f1_micro": lambda y, p: skm.f1_score(y, p, average="micro", zero_division=0),
        "qwk": lambda y, p: skm.cohen_kappa_score(y, p, weights="quadratic"),
    }[metric]
    gen = np.random.default_rng(1)
    for case in range(300):
        classes = 2 if metric == "f1" else int(gen.integers(2, 40))
        n = int(gen.integers(1, 400))
        skew = gen.dirichlet(np.full(classes, 0.3))  # some classes all but absent
        labels = gen.choice(classes, n, p=skew)
        pred = np.where(gen.random(n) < 0.6, labels, gen.choice(classes, n, p=gen.dirichlet(np.ones(classes))))
        if case % 50 == 0:
            labels[:] = pred[:] = 1  # one class alone
        if case % 7 == 0 and metric != "f1":
            labels, pred = labels * 5000, pred * 5000  # sparse ids: a dense 5000^2 matrix would not do
        dtype = (np.int64, np.int32, np.uint8, bool)[case % 4]
        if (dtype is bool and labels.max() > 1) or (dtype is np.uint8 and labels.max() > 255):
            dtype = np.int64  # the labels' dtype as callers may hand it; the decisions stay int64 (argmax)
        labels = labels.astype(dtype)
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # scikit-learn warns about the degenerate cases it scores
            expected = reference(labels, pred)
        got = score_labels(metric, labels, pred)
        assert got == expected or (math.isnan(got) and math.isnan(expected)), (case, got, expected)
