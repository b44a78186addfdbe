"""The soft-target losses of distillation, checked against hand computations, and the soft-target file's checks."""

import numpy as np
import pytest
import torch

from distrain.config import ConfigError
from distrain.study.plan import WHOLE_POOL, Job
from distrain.study.soft_targets import SoftTargets, read_soft_targets, write_soft_targets
from distrain.tasks import get_task
from distrain.tasks.losses import CrossEntropy, Distilled, sigmoid_distillation, softmax_distillation


def softmax(x, t):
    e = np.exp(x / t - (x / t).max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_softmax_distillation_is_t_squared_times_the_kl_of_softened_rows(temperature):
    rng = np.random.default_rng(0)
    logits, teacher_logits = rng.normal(size=(6, 5)), rng.normal(size=(6, 5)) * 2
    teacher = softmax(teacher_logits, 1.0)
    q, p = softmax(np.log(teacher), temperature), softmax(logits, temperature)  # softened as logits would be
    by_hand = (q * (np.log(q) - np.log(p))).sum(axis=1).mean() * temperature**2
    got = softmax_distillation(torch.tensor(logits), torch.tensor(teacher), temperature)
    assert float(got) == pytest.approx(by_hand, rel=1e-5)
    # the student that predicts the teacher's rows has nothing left to learn
    same = softmax_distillation(torch.tensor(np.log(teacher)), torch.tensor(teacher), temperature)
    assert float(same) == pytest.approx(0.0, abs=1e-6)


def test_sigmoid_distillation_is_the_bernoulli_kl_per_label():
    rng = np.random.default_rng(1)
    logits, teacher = rng.normal(size=(4, 3)), rng.uniform(0.05, 0.95, size=(4, 3))
    t = 2.0
    q = 1 / (1 + np.exp(-np.log(teacher / (1 - teacher)) / t))
    p = 1 / (1 + np.exp(-logits / t))
    kl = q * np.log(q / p) + (1 - q) * np.log((1 - q) / (1 - p))
    got = sigmoid_distillation(torch.tensor(logits), torch.tensor(teacher), t)
    assert float(got) == pytest.approx(kl.sum(axis=1).mean() * t * t, rel=1e-4)
    assert get_task("multilabel").distillation_loss(torch.tensor(logits), torch.tensor(teacher), t) == got


def test_distilled_loss_weighs_hard_and_soft_terms():
    rng = np.random.default_rng(2)
    logits, teacher = torch.tensor(rng.normal(size=(8, 4))), torch.tensor(softmax(rng.normal(size=(8, 4)), 1.0))
    labels = torch.tensor(rng.integers(0, 4, size=8))
    hard, soft = CrossEntropy(), get_task("multiclass").distillation_loss
    for alpha in (0.0, 0.3, 1.0):
        got = Distilled(hard, soft, alpha, 3.0)(logits, labels, teacher=teacher)
        want = (1 - alpha) * hard(logits, labels) + alpha * softmax_distillation(logits, teacher, 3.0)
        assert float(got) == pytest.approx(float(want), rel=1e-6)
    with pytest.raises(NotImplementedError, match="no soft-target loss"):
        get_task("segmentation").distillation_loss(logits, teacher, 3.0)


def test_a_whole_pool_job_is_named_apart_from_the_folds():
    assert Job("m", 42, WHOLE_POOL).id == "m-s42-whole" and Job("m", 42, 0).id == "m-s42-f0"
    assert Job("m", 42, WHOLE_POOL).whole_pool and not Job("m", 42, 0).whole_pool


def targets(ids, probs, folds=2):
    probs = np.asarray(probs, np.float32)
    return SoftTargets(ids, probs, np.stack([probs] * folds))


@pytest.mark.parametrize(
    "ids, probs, message",
    [
        (["a", "b"], np.full((2, 3), 1 / 3), "no soft target for 1 CV sample(s) (e.g. c)"),
        (["a", "b", "c", "t"], np.full((4, 3), 1 / 3), "holds 1 holdout sample(s) (e.g. t)"),
        (["a", "b", "c"], np.full((3, 2), 0.5), "probs has shape (3, 2), expected (3, 3)"),
        (["a", "b", "c"], np.full((3, 3), 2.0), "probs must be probabilities in [0, 1]"),
    ],
)
def test_soft_target_files_are_refused_in_one_line(tmp_path, ids, probs, message):
    path = write_soft_targets(tmp_path / "t.npz", targets(ids, probs))
    with pytest.raises(ConfigError, match="distill.teacher: ") as e:
        read_soft_targets(path, {"a", "b", "c"}, {"t"}, 3, 2)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_missing_foreign_or_other_fold_count_soft_target_file_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="not a soft-target file"):
        read_soft_targets(tmp_path / "none.npz", {"a"}, set(), 2, 2)
    np.savez(tmp_path / "other.npz", sample_ids=np.asarray(["a"]), probs=np.array([[0.2, 0.8]]))  # no fold rows
    with pytest.raises(ConfigError, match="not a soft-target file"):
        read_soft_targets(tmp_path / "other.npz", {"a"}, set(), 2, 2)
    path = write_soft_targets(tmp_path / "ok.npz", targets(["a"], [[0.2, 0.8]], folds=3))
    with pytest.raises(ConfigError, match=r"fold_probs has shape \(3, 1, 2\), expected \(5, 1, 2\)"):
        read_soft_targets(path, {"a"}, set(), 2, 5)
    got = read_soft_targets(path, {"a"}, set(), 2, 3)
    assert got.sample_ids == ["a"] and got.of_fold(-1)[0].tolist() == pytest.approx([0.2, 0.8])
    assert got.of_fold(2).shape == (1, 2) and got.probs.dtype == np.float32


def test_soft_pseudo_targets_give_pseudo_samples_their_fold_row_and_the_others_their_one_hot_row():
    from distrain.config import PseudoConfig
    from distrain.study.pseudo_labels import PseudoLabels
    from distrain.training.distill import SoftPseudoTargets

    probs = np.array([[[0.95, 0.05], [0.6, 0.4], [0.08, 0.92]], [[0.5, 0.5], [0.05, 0.95], [0.2, 0.8]]])
    labels = PseudoLabels(["u0", "u1", "u2"], probs, np.ones((2, 3), int), columns=1)
    settings = PseudoConfig(labels="p.npz", threshold=0.9)
    targets = SoftPseudoTargets(labels, 0, settings, 0.1, torch.device("cpu"))  # fold 0 takes u0 and u2
    got = targets.of(["a", "u2", "u0", "b"], torch.tensor([1, 1, 0, 0]))
    want = [[0.05, 0.95], [0.08, 0.92], [0.95, 0.05], [0.95, 0.05]]  # smoothed one-hot, fold 0's rows, one-hot
    np.testing.assert_allclose(got.numpy(), want, atol=1e-6)
    other = SoftPseudoTargets(labels, 1, settings, 0.0, torch.device("cpu"))  # fold 1 takes u1 alone
    np.testing.assert_allclose(other.of(["u1", "u0"], torch.tensor([1, 0])).numpy(), [[0.05, 0.95], [1.0, 0.0]])
