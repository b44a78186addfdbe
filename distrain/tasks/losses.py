"""The classification losses, built by the tasks from `train.loss` (which the config checked fits the task).

Every loss takes the model's logits [n, C] and either integer labels [n] or soft targets [n, C] (Mixup /
CutMix, whose targets already carry the label smoothing), and returns the batch mean. The label-set loss
takes 0/1 integer rows [n, L] (smoothed here) or float soft targets [n, L] (Mixup's, already smoothed), and
averages over every (sample, label).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import sigmoid_focal_loss


def smoothed_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """One-hot targets with `smoothing` spread evenly over the classes (as torch's cross-entropy smooths)."""
    return F.one_hot(labels, num_classes).float() * (1.0 - smoothing) + smoothing / num_classes


class CrossEntropy(nn.Module):
    """Softmax cross-entropy of integer labels (with label smoothing) or of soft targets."""

    def __init__(self, label_smoothing: float = 0.0):
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if target.ndim == 2:  # soft targets: smoothing already folded in
            return torch.sum(-target * F.log_softmax(logits.float(), dim=1), dim=1).mean()
        return F.cross_entropy(logits.float(), target, label_smoothing=self.label_smoothing)


class FocalLoss(nn.Module):
    """Softmax focal loss (Lin et al. 2017): -sum_c w_c q_c (1 - p_c)^gamma log p_c, with q the (smoothed)
    one-hot or soft target and w optional class weights. gamma 0 and no weights is cross-entropy."""

    def __init__(self, gamma: float, label_smoothing: float = 0.0, class_weights: list[float] | None = None):
        super().__init__()
        self.gamma, self.label_smoothing = gamma, label_smoothing
        self.register_buffer("class_weights", torch.tensor(class_weights) if class_weights else None)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        log_p = F.log_softmax(logits.float(), dim=1)
        if target.ndim == 1:
            target = smoothed_one_hot(target, logits.shape[1], self.label_smoothing)
        terms = target * (1.0 - log_p.exp()).pow(self.gamma) * log_p
        if self.class_weights is not None:
            terms = terms * self.class_weights.to(terms.device)
        return -terms.sum(dim=1).mean()


class BinaryCrossEntropy(nn.Module):
    """Binary cross-entropy with logits on p(positive) of a 2-logit head: p = softmax(z)[1] = sigmoid(z1 - z0),
    so the head, probabilities and ensembles stay those of two classes. `pos_weight` scales the positives'
    term (torch's pos_weight)."""

    def __init__(self, pos_weight: float = 1.0, label_smoothing: float = 0.0):
        super().__init__()
        self.pos_weight, self.label_smoothing = pos_weight, label_smoothing

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if target.ndim == 2:
            y = target[:, 1].float()
        else:
            y = target.float() * (1.0 - self.label_smoothing) + self.label_smoothing / 2
        pos_weight = _constant(self.pos_weight, logits.device)
        return F.binary_cross_entropy_with_logits(logits[:, 1] - logits[:, 0], y, pos_weight=pos_weight)


class LabelSetLoss(nn.Module):
    """Per-label sigmoid losses of a label-set head: binary cross-entropy with logits (`pos_weight` on the
    positives' term), or with `focal_gamma` the sigmoid focal loss (torchvision's, `alpha` weighting the
    positives, 0 for none)."""

    def __init__(self, label_smoothing: float = 0.0, pos_weight: float = 1.0, focal_gamma: float | None = None,
                 alpha: float = 0.0):  # fmt: skip
        super().__init__()
        self.label_smoothing, self.pos_weight = label_smoothing, pos_weight
        self.focal_gamma, self.alpha = focal_gamma, alpha

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        y = target.float()
        if not target.is_floating_point():  # hard 0/1 rows: smoothed towards 0.5 (Mixup's come smoothed)
            y = y * (1.0 - self.label_smoothing) + self.label_smoothing / 2
        if self.focal_gamma is not None:
            return sigmoid_focal_loss(logits, y, alpha=self.alpha or -1.0, gamma=self.focal_gamma, reduction="mean")
        pos_weight = _constant(self.pos_weight, logits.device)
        return F.binary_cross_entropy_with_logits(logits, y, pos_weight=pos_weight)


@functools.lru_cache(maxsize=32)
def _constant(value: float, device: torch.device) -> torch.Tensor:
    """A scalar loss constant on the device, made once (not a synchronising host-to-device copy per step)."""
    return torch.tensor(value, device=device)


def softmax_distillation(logits: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher_T || student_T) x T^2, the batch mean, of one-of-C rows: teacher_T = softmax(log p / T) (the
    teacher's probabilities `teacher` [n, C] softened as its logits would be), student_T = softmax(z / T)."""
    t = temperature
    log_q = F.log_softmax(teacher.float().clamp_min(1e-8).log() / t, dim=1)
    log_p = F.log_softmax(logits.float() / t, dim=1)
    return (log_q.exp() * (log_q - log_p)).sum(dim=1).mean() * t * t


def sigmoid_distillation(logits: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """The label-set form: each label's Bernoulli KL(teacher_T || student_T) x T^2, summed over the labels and
    averaged over the batch, with teacher_T = sigmoid(logit(p) / T) and student_T = sigmoid(z / T)."""
    t = temperature
    q = torch.sigmoid(torch.logit(teacher.float().clamp(1e-6, 1 - 1e-6)) / t)
    cross = F.binary_cross_entropy_with_logits(logits.float() / t, q, reduction="none")
    entropy = F.binary_cross_entropy(q, q, reduction="none")
    return (cross - entropy).sum(dim=1).mean() * t * t


class Distilled(nn.Module):
    """(1 - alpha) x the task's hard-label loss + alpha x its soft-target loss against the teacher's rows of the
    same batch (`teacher=`, handed in per micro-batch)."""

    def __init__(self, hard: nn.Module, soft, alpha: float, temperature: float):
        super().__init__()
        self.hard, self.soft, self.alpha, self.temperature = hard, soft, alpha, temperature

    def forward(self, logits: torch.Tensor, target: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        soft = self.soft(logits, teacher, self.temperature)
        if self.alpha == 1.0:
            return soft
        return (1.0 - self.alpha) * self.hard(logits, target) + self.alpha * soft
