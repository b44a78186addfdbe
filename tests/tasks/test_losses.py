"""Each loss against a hand computation on a fixed batch."""

import math

import pytest
import torch
import torch.nn.functional as F

from distrain.config import TrainConfig
from distrain.tasks import get_task
from distrain.tasks.losses import BinaryCrossEntropy, CrossEntropy, FocalLoss


def create_loss(tc: TrainConfig, task: str) -> torch.nn.Module:
    return get_task(task).create_loss(tc.loss_settings())


LOGITS = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]])
LABELS = torch.tensor([0, 1])


def softmax_row(row):
    exps = [math.exp(v) for v in row]
    return [e / sum(exps) for e in exps]


def test_cross_entropy_with_label_smoothing_matches_the_formula():
    eps, total = 0.1, 0.0
    for row, label in zip(LOGITS.tolist(), LABELS.tolist()):
        p = softmax_row(row)
        q = [(1 - eps) * (c == label) + eps / 3 for c in range(3)]
        total += -sum(qc * math.log(pc) for qc, pc in zip(q, p))
    assert CrossEntropy(eps)(LOGITS, LABELS).item() == pytest.approx(total / 2, rel=1e-6)


def test_focal_loss_matches_the_formula_and_is_cross_entropy_at_gamma_zero():
    gamma, total = 2.0, 0.0
    for row, label in zip(LOGITS.tolist(), LABELS.tolist()):
        p = softmax_row(row)[label]
        total += -((1 - p) ** gamma) * math.log(p)
    assert FocalLoss(gamma)(LOGITS, LABELS).item() == pytest.approx(total / 2, rel=1e-6)
    assert FocalLoss(gamma)(LOGITS, LABELS) < CrossEntropy()(LOGITS, LABELS)  # easy samples weigh less
    for eps in (0.0, 0.1):
        assert FocalLoss(0.0, eps)(LOGITS, LABELS).item() == pytest.approx(CrossEntropy(eps)(LOGITS, LABELS).item())
    soft = torch.tensor([[0.7, 0.3, 0.0], [0.0, 0.4, 0.6]])  # Mixup targets
    assert FocalLoss(0.0)(LOGITS, soft).item() == pytest.approx(CrossEntropy()(LOGITS, soft).item())
    assert CrossEntropy()(LOGITS, soft).item() == pytest.approx(-(soft * F.log_softmax(LOGITS, 1)).sum(1).mean().item())


def test_binary_focal_alpha_weights_the_positive_class():
    logits, labels = torch.tensor([[0.0, 1.0], [0.5, -0.5]]), torch.tensor([1, 0])
    alpha, gamma, total = 0.25, 2.0, 0.0
    for row, label in zip(logits.tolist(), labels.tolist()):
        p = softmax_row(row)[label]
        total += -(alpha if label == 1 else 1 - alpha) * (1 - p) ** gamma * math.log(p)
    loss = create_loss(TrainConfig(loss="focal", focal_gamma=gamma, focal_alpha=alpha), "binary")
    assert loss(logits, labels).item() == pytest.approx(total / 2, rel=1e-6)


def test_bce_on_the_positive_logit_with_pos_weight_and_smoothing():
    logits, labels = torch.tensor([[0.0, 1.0], [0.5, -0.5], [1.0, 1.0]]), torch.tensor([1, 0, 1])
    w, eps, total = 3.0, 0.1, 0.0
    for (z0, z1), label in zip(logits.tolist(), labels.tolist()):
        p = 1 / (1 + math.exp(-(z1 - z0)))
        y = label * (1 - eps) + eps / 2
        total += -(w * y * math.log(p) + (1 - y) * math.log(1 - p))
    assert BinaryCrossEntropy(w, eps)(logits, labels).item() == pytest.approx(total / 3, rel=1e-6)
    # p = sigmoid(z1 - z0) is the softmax's p(positive): bce scores the same probability the head reports
    assert torch.allclose(torch.sigmoid(logits[:, 1] - logits[:, 0]), torch.softmax(logits, 1)[:, 1])


@pytest.mark.parametrize("name, cls", [("ce", CrossEntropy), ("focal", FocalLoss), ("bce", BinaryCrossEntropy)])
def test_train_loss_picks_the_loss(name, cls):
    assert isinstance(create_loss(TrainConfig(loss=name), "binary"), cls)


ML_LOGITS = torch.tensor([[2.0, -1.0, 0.5], [-0.5, 1.5, -2.0]])
ML_LABELS = torch.tensor([[1, 0, 1], [0, 0, 1]])  # 0/1 rows, as the loaders give them


def sigmoid(z):
    return 1 / (1 + math.exp(-z))


def test_multilabel_bce_and_sigmoid_focal_match_the_formulas():
    w, eps, gamma, alpha = 2.0, 0.1, 2.0, 0.25
    bce = focal = 0.0
    for row, labels in zip(ML_LOGITS.tolist(), ML_LABELS.tolist()):
        for z, label in zip(row, labels):
            p, y = sigmoid(z), label * (1 - eps) + eps / 2
            bce += -(w * y * math.log(p) + (1 - y) * math.log(1 - p))
            p_t = p if label else 1 - p
            focal += -(alpha if label else 1 - alpha) * (1 - p_t) ** gamma * math.log(p_t)
    bce_loss = create_loss(TrainConfig(loss="bce", pos_weight=w, label_smoothing=eps), "multilabel")
    assert bce_loss(ML_LOGITS, ML_LABELS).item() == pytest.approx(bce / 6, rel=1e-6)
    focal_loss = create_loss(TrainConfig(loss="focal", focal_gamma=gamma, focal_alpha=alpha), "multilabel")
    assert focal_loss(ML_LOGITS, ML_LABELS).item() == pytest.approx(focal / 6, rel=1e-6)
    plain_focal = create_loss(TrainConfig(loss="focal", focal_gamma=0.0), "multilabel")
    plain_bce = create_loss(TrainConfig(loss="bce"), "multilabel")
    assert plain_focal(ML_LOGITS, ML_LABELS).item() == pytest.approx(plain_bce(ML_LOGITS, ML_LABELS).item())
    soft = torch.tensor([[0.7, 0.3, 1.0], [0.0, 0.4, 0.6]])  # Mixup's rows come smoothed: not smoothed again
    expected = F.binary_cross_entropy_with_logits(ML_LOGITS, soft, pos_weight=torch.tensor(w))
    assert bce_loss(ML_LOGITS, soft).item() == pytest.approx(expected.item())
