"""Image pairs: each sample holds two images and one label for the pair, `pair_binary` (same / different, a binary
task: label 1 the positive, e.g. "same") or `pair_multiclass` (one class of the pair's relation).

A pair travels as one sample whose two images are stacked on channels ([2C, H, W]): both get the same kind of
transform (each its own random draw), and normalising, random erasing, Mixup / CutMix and TTA treat the pair as
one. The network is a siamese one (`distrain.tasks.siamese`): one shared encoder (any timm backbone, or your own
factory's network, without its classifier) for both images, then a head on how the embeddings compare
(`model.comparison`); with `model.comparison: []` the network (your factory's) takes the stacked pair itself.
Predictions, scores, ensembles and thresholds are those of the one-image task of the same kind.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from distrain.tasks.base import HeadSettings, Label
from distrain.tasks.classification import Binary, Multiclass

if TYPE_CHECKING:
    import torch


class PairTask:
    """What pair tasks add to their one-image kind: two images per sample and a siamese network."""

    images_per_sample = 2
    digits_source = None

    def build_model(
        self, make: Callable[..., torch.nn.Module], num_classes: int, in_chans: int, head: HeadSettings = HeadSettings()
    ) -> torch.nn.Module:
        if not head.comparison:  # the network takes the stacked pair itself
            return make(num_classes=num_classes, in_chans=2 * in_chans)
        from distrain.tasks.siamese import SiameseNet

        return SiameseNet(make(num_classes=0, in_chans=in_chans), num_classes, head.comparison)

    def digits_labels(self, digits: np.ndarray) -> tuple[list[Label], list[str]]:
        raise NotImplementedError(f"task {self.name} has no one-image digits demo (pairs are packed from arrays)")


class PairBinary(PairTask, Binary):
    name = "pair_binary"
    description = "two images per sample, label 1 the positive relation (e.g. the same class); siamese network"
    digits_source = "digits_pairs"

    def digits_labels(self, digits: np.ndarray) -> tuple[list[Label], list[str]]:
        """The demo's labels of digits taken two at a time, (a, b) pairs: 1 for the same digit."""
        pairs = np.asarray(digits).reshape(-1, 2)
        return [int(a == b) for a, b in pairs], ["different", "same"]


class PairMulticlass(PairTask, Multiclass):
    name = "pair_multiclass"
    description = "two images per sample, one class of their relation; siamese network"
