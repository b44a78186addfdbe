"""Semantic segmentation as a `Task`: a per-pixel class head on the FPN of a timm `features_only` backbone
(`distrain.tasks.segmentation`), trained with CE + Dice on class-id masks, scored by mean IoU or F-score.

A training sample is a uint8 image [3, S, S] and its mask [S, S] (class ids, 255 unlabelled), moved together by
one random affine; an evaluation sample's label row is the mask on a `grid_side(S, C)`² grid (nearest pixel),
flattened, and its prediction row the C class-probability maps on the same grid, flattened class by class. The
grid keeps C x side² <= 25,600 values per image (100 KB in float32, as text detection's maps). The per-epoch score
is the metric itself (a confusion matrix summed over the images), so a job's score needs no second pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from distrain.tasks.base import HeadSettings, Label, LossSettings, MetaTarget, Task
from distrain.tasks.metrics import Threshold

if TYPE_CHECKING:
    import torch

MAX_VALUES = 160 * 160
"""The most values stored per image (all classes' maps together)."""

IGNORE = 255
"""A mask's unlabelled pixels: counted by neither the loss nor the metrics."""


def grid_side(image_size: int, num_classes: int) -> int:
    """The side of the stored maps of images decoded at `image_size`, for `num_classes` classes."""
    return min(image_size, math.isqrt(MAX_VALUES // num_classes))


def label_grid(mask: np.ndarray, side: int) -> np.ndarray:
    """A square class-id mask [S, S] on the side x side grid, each cell the mask's pixel at its top-left sample
    point (as torch's nearest interpolation); one function for training's label rows and the aggregation's."""
    index = np.arange(side) * mask.shape[0] // side
    return mask[np.ix_(index, index)]


def fit_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """A class-id mask fitted into the size x size canvas as its image is (`tasks.detection.augment.fit_canvas`):
    nearest pixel, the canvas outside the image unlabelled."""
    import cv2

    scale = size / max(mask.shape)
    new_w, new_h = max(1, round(mask.shape[1] * scale)), max(1, round(mask.shape[0] * scale))
    canvas = np.full((size, size), IGNORE, np.uint8)
    canvas[:new_h, :new_w] = cv2.resize(mask, (new_w, new_h), interpolation=cv2.INTER_NEAREST)
    return canvas


def mask_scores(labels: np.ndarray, probs: np.ndarray) -> dict:
    """mIoU, F-score and pixel accuracy of prediction rows [n, C x side²] against label rows [n, side²]."""
    classes = probs.shape[1] // labels.shape[1]
    decided = probs.reshape(len(probs), classes, -1).argmax(axis=1)
    return segmentation_scores(confusion(labels, decided, classes, IGNORE))


def confusion(truth: np.ndarray, pred: np.ndarray, num_classes: int, ignore_index: int = IGNORE) -> np.ndarray:
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


class Segmentation(Task):
    name = "segmentation"
    description = "a class per pixel (masks of class ids, 255 unlabelled); FPN head on a features_only backbone"
    metrics = ("miou", "fscore")
    losses = ("ce_dice",)
    annotation = "mask.png"

    def digits_labels(self, digits: np.ndarray) -> tuple[list[Label], list[str]]:
        raise NotImplementedError("segmentation has no digits demo: `distrain data synth-shapes` makes images")

    def score(self, metric: str, labels: np.ndarray, probs: np.ndarray, threshold: Threshold = None) -> float:
        if metric not in self.metrics:
            raise ValueError(f"task segmentation scores {self.metrics}, not {metric!r}")
        return mask_scores(labels, probs)[metric]

    def _no_rows(self, *args) -> np.ndarray:
        raise NotImplementedError("segmentation's ensembles combine maps (distrain.ensembles.dense)")

    decide = hard_vote = k_of_n_decisions = true_probabilities = _no_rows  # rows of classes do not apply

    def meta_targets(self, num_classes: int) -> list[MetaTarget]:
        return []

    def build_model(
        self, make: Callable[..., torch.nn.Module], num_classes: int, in_chans: int, head: HeadSettings = HeadSettings()
    ) -> torch.nn.Module:
        """The FPN segmentation network on `make`'s backbone built with `features_only=True`."""
        from distrain.tasks.segmentation import SegNet

        backbone = make(num_classes=0, in_chans=in_chans, features_only=True)
        return SegNet(backbone, num_classes, inner=head.neck_channels)

    def activate(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits [B, C, S, S] -> the class probabilities on the stored grid, flattened class by class."""
        import torch.nn.functional as F

        side = grid_side(logits.shape[-1], logits.shape[1])
        return F.adaptive_avg_pool2d(logits.float().softmax(dim=1), side).flatten(1)

    def create_loss(self, settings: LossSettings) -> torch.nn.Module:
        from distrain.tasks.segmentation import CEDiceLoss

        return CEDiceLoss(ignore_index=IGNORE)

    def batch_correct(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Nothing is counted per sample (the loop's train accuracy reads 0)."""
        return logits.new_zeros(())

    def validation_loss(self, probs: np.ndarray, labels: np.ndarray) -> float:
        """Pixel cross-entropy of the stored maps, unlabelled pixels left out."""
        classes = probs.shape[1] // labels.shape[1]
        maps = probs.reshape(len(probs), classes, -1)
        keep = labels != IGNORE
        picked = np.take_along_axis(maps, np.where(keep, labels, 0)[:, None, :].astype(np.int64), axis=1)[:, 0]
        return float(-np.log(np.clip(picked[keep], 1e-7, 1.0)).mean()) if keep.any() else 0.0
