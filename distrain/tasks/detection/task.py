"""Text detection as a `Task`: DBNet (`network`) on a timm `features_only` backbone, trained on DB targets with the
DB loss, predicting a probability map per image.

What flows through the generic machinery:
- a training sample is a uint8 image [3, S, S] and its DB targets [4, S, S] (`distrain.data.dense`);
- an evaluation sample's label is its *label row*: the words' shrunk kernels on a `map_side(S)`² grid, flattened
  (1 text, 0 background, 2 don't-care), and its prediction row is the probability map on the same grid. Rows have
  one length per image size, so the OOF store, the gathering across ranks and the per-epoch score are the ones
  classification uses. The map side is at most `MAX_MAP_SIDE`: 160² = 25,600 float32 values, 100 KB per image
  and column in the OOF store (10 GB per column at 100k images), whatever the training resolution;
- the per-epoch score is `pixel_f1` (cheap); the H-mean of boxes (contours, unclipping, matching at IoU 0.5) is
  computed from the stored maps after the last job, with the post-processing tuned on OOF
  (`distrain.tasks.detection.ensembles`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from distrain.tasks.base import HeadSettings, Label, LossSettings, MetaTarget, Task
from distrain.tasks.metrics import Threshold

if TYPE_CHECKING:
    import torch

MAX_MAP_SIDE = 160
"""The largest side of a stored probability map (and label row): 640 px images are kept at stride 4."""

TEXT, BACKGROUND, DONT_CARE = 1, 0, 2
"""The values of a label row."""


def map_side(image_size: int) -> int:
    """The side of the stored map of images decoded at `image_size`."""
    return min(image_size, MAX_MAP_SIDE)


def pixel_f1(labels: np.ndarray, probs: np.ndarray, threshold: float = 0.5) -> float:
    """F1 of `probs >= threshold` against the label rows' text pixels, don't-care pixels left out (1.0 when
    neither has a text pixel)."""
    care = labels != DONT_CARE
    predicted, truth = (probs >= threshold) & care, labels == TEXT
    tp = int((predicted & truth).sum())
    denominator = int(predicted.sum()) + int(truth.sum())
    return 1.0 if denominator == 0 else 2.0 * tp / denominator


class TextDetection(Task):
    name = "text_detection"
    description = "text regions per image (polygons), DBNet on a features_only backbone; H-mean of boxes"
    metrics = ("pixel_f1",)
    losses = ("db",)
    annotation = "json"

    def config_problems(self, num_classes: int) -> list[str]:
        if num_classes == 1:
            return []
        return [f"data.num_classes: invalid value {num_classes} (expected 1 for task: text_detection: 'text')"]

    def digits_labels(self, digits: np.ndarray) -> tuple[list[Label], list[str]]:
        raise NotImplementedError("text_detection has no digits demo: `distrain data synth-text` makes receipts")

    def decide(self, probs: np.ndarray, threshold: Threshold = None) -> np.ndarray:
        """Text pixels of the maps: p >= 0.5 (or `threshold`)."""
        return (probs >= (0.5 if threshold is None else threshold)).astype(np.uint8)

    def score(self, metric: str, labels: np.ndarray, probs: np.ndarray, threshold: Threshold = None) -> float:
        if metric != "pixel_f1":
            raise ValueError(f"task text_detection scores pixel_f1 per epoch, not {metric!r}")
        return pixel_f1(labels, probs, 0.5 if threshold is None else float(threshold))

    def _no_rows(self, *args) -> np.ndarray:
        raise NotImplementedError("text_detection's ensembles combine maps and boxes (tasks.detection.ensembles)")

    hard_vote = k_of_n_decisions = true_probabilities = _no_rows  # the class-row ensembles do not apply

    def meta_targets(self, num_classes: int) -> list[MetaTarget]:
        return []

    def build_model(
        self, make: Callable[..., torch.nn.Module], num_classes: int, in_chans: int, head: HeadSettings = HeadSettings()
    ) -> torch.nn.Module:
        """DBNet on `make`'s backbone built with `features_only=True`, its neck and head `head.neck_channels` wide."""
        from distrain.tasks.detection.network import DBNet

        return DBNet(make(num_classes=0, in_chans=in_chans, features_only=True), inner=head.neck_channels)

    def activate(self, logits: torch.Tensor) -> torch.Tensor:
        """DBNet's output [B, 3, S, S] -> the probability maps on the stored grid, flattened [B, side²]."""
        import torch.nn.functional as F

        side = map_side(logits.shape[-1])
        return F.adaptive_avg_pool2d(logits[:, :1].float(), side).flatten(1)

    def create_loss(self, settings: LossSettings) -> torch.nn.Module:
        from distrain.tasks.detection.loss import DBLoss

        return DBLoss()

    def batch_correct(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Nothing is counted per sample (the loop's train accuracy reads 0)."""
        return logits.new_zeros(())

    def validation_loss(self, probs: np.ndarray, labels: np.ndarray) -> float:
        """Binary cross-entropy of the stored maps against the label rows, don't-care pixels left out."""
        care = labels != DONT_CARE
        p = np.clip(probs[care].astype(np.float64), 1e-7, 1 - 1e-7)
        y = labels[care] == TEXT
        return float(-np.mean(np.where(y, np.log(p), np.log(1 - p)))) if p.size else 0.0
