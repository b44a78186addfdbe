"""Semantic segmentation pieces: a per-pixel class head on the shared FPN, the CE + Dice loss (the practitioners'
weights 1.0 / 1.5 as an example), mIoU and per-class F-score from a confusion matrix that sums over images, and
the ensembles of class-probability maps (their mean, and per-pixel "at least k of n models"; numpy, in
`tasks.semantic`).

Masks are [H, W] integer class ids; `ignore_index` (255, as in VOC / Cityscapes) marks unlabelled pixels, which
neither the loss nor the metrics count."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from distrain.tasks.necks import FPN, check_input_size, conv_bn_relu, fpn_levels

IGNORE_INDEX = 255  # tasks.semantic.IGNORE (this module is the torch half: imported from there, not importing it)


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
