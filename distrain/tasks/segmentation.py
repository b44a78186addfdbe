"""Semantic segmentation pieces: a per-pixel class head on the shared FPN, the CE + Dice loss (the practitioners'
weights 1.0 / 1.5 as an example), mIoU and per-class F-score from a confusion matrix that sums over images, and
the ensembles of class-probability maps (their mean, and per-pixel "at least k of n models").

Masks are [H, W] integer class ids; `ignore_index` (255, as in VOC / Cityscapes) marks unlabelled pixels, which
neither the loss nor the metrics count."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from distrain.tasks.necks import FPN, check_input_size, conv_bn_relu, fpn_levels

IGNORE_INDEX = 255


class SegNet(nn.Module):
    """[B, C, H, W] images -> [B, classes, H, W] logits: FPN at stride 4, a 3x3 conv, a 1x1 classifier, bilinear
    upsampling to the input size."""

    def __init__(self, backbone: nn.Module, num_classes: int, inner: int = 256):
        super().__init__()
        self.levels, channels = fpn_levels(backbone)
        self.backbone = backbone
        self.neck = FPN(channels, inner)
        self.head = nn.Sequential(conv_bn_relu(inner, inner // 4, 3), nn.Conv2d(inner // 4, num_classes, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        check_input_size(images)
        features = self.backbone(images)
        logits = self.head(self.neck([features[i] for i in self.levels]))
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)


@dataclass(frozen=True)
class SegLossWeights:
    cross_entropy: float = 1.0
    dice: float = 1.5


class CEDiceLoss(nn.Module):
    """weights.cross_entropy * pixel cross-entropy + weights.dice * (1 - mean over classes present in the batch
    of the soft Dice coefficient); `ignore_index` pixels count in neither."""

    def __init__(self, weights: SegLossWeights = SegLossWeights(), ignore_index: int = IGNORE_INDEX):
        super().__init__()
        self.weights, self.ignore_index = weights, ignore_index

    def forward(self, logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        ce = F.cross_entropy(logits, masks, ignore_index=self.ignore_index)
        valid = (masks != self.ignore_index).unsqueeze(1).float()
        probs = logits.softmax(dim=1) * valid
        onehot = F.one_hot(masks.clamp_max(logits.shape[1] - 1) * (masks != self.ignore_index), logits.shape[1])
        onehot = onehot.permute(0, 3, 1, 2).float() * valid
        inter, total = (probs * onehot).sum(dim=(0, 2, 3)), (probs + onehot).sum(dim=(0, 2, 3))
        present = onehot.sum(dim=(0, 2, 3)) > 0
        dice = (2 * inter / total.clamp_min(1e-6))[present].mean() if present.any() else logits.new_tensor(1.0)
        return self.weights.cross_entropy * ce + self.weights.dice * (1 - dice)


def confusion(truth: np.ndarray, pred: np.ndarray, num_classes: int, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """[classes, classes] pixel counts (row: true class, column: predicted); sum these over images."""
    keep = truth != ignore_index
    flat = truth[keep].astype(np.int64) * num_classes + pred[keep].astype(np.int64)
    return np.bincount(flat, minlength=num_classes**2).reshape(num_classes, num_classes)


def segmentation_scores(matrix: np.ndarray) -> dict:
    """Per-class IoU and F-score (Dice) of a summed confusion matrix, their means over the classes that occur
    (in the truth or the predictions), and pixel accuracy."""
    tp = np.diag(matrix).astype(np.float64)
    fp, fn = matrix.sum(axis=0) - tp, matrix.sum(axis=1) - tp
    occurs = (tp + fp + fn) > 0
    iou = np.divide(tp, tp + fp + fn, out=np.zeros_like(tp), where=occurs)
    fscore = np.divide(2 * tp, 2 * tp + fp + fn, out=np.zeros_like(tp), where=occurs)
    return {"miou": float(iou[occurs].mean()) if occurs.any() else 0.0,
            "fscore": float(fscore[occurs].mean()) if occurs.any() else 0.0,
            "pixel_accuracy": float(tp.sum() / max(matrix.sum(), 1)),
            "iou": iou.tolist(), "fscore_per_class": fscore.tolist()}  # fmt: skip


def mean_of_maps(probs: np.ndarray) -> np.ndarray:
    """Soft vote of M models' class-probability maps [M, classes, H, W] -> [H, W] class ids."""
    return probs.mean(axis=0).argmax(axis=0)


def k_of_n_pixels(probs: np.ndarray, k: int, background: int = 0) -> np.ndarray:
    """Per pixel, the class that at least k of the M models predict (the most voted among those, ties by mean
    probability); `background` where none reaches k."""
    m, c = probs.shape[:2]
    if not 1 <= k <= m:
        raise ValueError(f"k-of-n needs 1 <= k <= n models, got k={k} of n={m}")
    decisions = probs.argmax(axis=1)  # [M, H, W]
    votes = np.stack([(decisions == j).sum(axis=0) for j in range(c)])  # [classes, H, W]
    ranked = votes + probs.mean(axis=0) / 2  # mean probability (< 1) orders classes with equal votes
    winner = ranked.argmax(axis=0)
    return np.where(votes.max(axis=0) >= k, winner, background)
