"""The DB loss (Liao et al. 2020, eq. 4; MMOCR's `DBModuleLoss`): a weighted sum of the probability map's
binary cross-entropy over the positives and the hardest negatives (3 per positive, `negative_ratio`), the L1
distance of the threshold map inside the threshold band, and the Dice loss of the approximate binary map. The
paper weighs them 1 / 10 / 1; MMOCR's DBNet configs 5 / 10 / 1 (the defaults here). All are configurable."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class DBLossWeights:
    probability: float = 5.0
    threshold: float = 10.0
    binary: float = 1.0
    negative_ratio: float = 3.0


def balanced_bce(prob: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, negative_ratio: float) -> torch.Tensor:
    """BCE over every positive pixel and the `negative_ratio` x as many highest-loss negatives, per batch (as DBNet
    mines: the whole batch's negatives ranked together). Masked pixels count as neither."""
    positive = (target * mask).flatten()
    negative = ((1 - target) * mask).flatten()
    n_pos = int(positive.sum().item())
    n_neg = min(int(negative.sum().item()), int(n_pos * negative_ratio)) if n_pos else min(int(negative.sum()), 100)
    loss = F.binary_cross_entropy(prob.flatten().clamp(1e-6, 1 - 1e-6), target.flatten(), reduction="none")
    hardest = torch.topk(loss * negative, n_neg).values if n_neg else loss.new_zeros(0)
    return ((loss * positive).sum() + hardest.sum()) / (n_pos + n_neg + 1e-6)


def masked_l1(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean |pred - target| over the mask's pixels (0 when the mask is empty)."""
    return ((pred - target).abs() * mask).sum() / (mask.sum() + 1e-6)


def dice_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - 2 |P ∩ G| / (|P| + |G|) over the mask's pixels."""
    inter = (pred * target * mask).sum()
    return 1 - 2 * inter / ((pred * mask).sum() + (target * mask).sum() + 1e-6)


class DBLoss(nn.Module):
    """`DBNet`'s output [B, 3, H, W] (P, T, B) against DB targets [B, 4, H, W] (shrink map, shrink mask,
    threshold map, threshold mask; `DBTargets.stacked()`) -> the weighted sum (a 0-dim tensor)."""

    def __init__(self, weights: DBLossWeights = DBLossWeights()):
        super().__init__()
        self.weights = weights

    def parts(self, output: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        """The three terms, unweighted (for logs)."""
        output, targets = output.float(), targets.float()
        prob, thresh, binary = output[:, 0], output[:, 1], output[:, 2]
        shrink, shrink_mask, thresh_map, thresh_mask = targets.unbind(dim=1)
        return {
            "probability": balanced_bce(prob, shrink, shrink_mask, self.weights.negative_ratio),
            "threshold": masked_l1(thresh, thresh_map, thresh_mask),
            "binary": dice_loss(binary, shrink, shrink_mask),
        }

    def forward(self, output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        parts = self.parts(output, targets)
        w = self.weights
        return w.probability * parts["probability"] + w.threshold * parts["threshold"] + w.binary * parts["binary"]
