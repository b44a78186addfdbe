"""The siamese network of the pair tasks: one encoder shared by both images of a pair, then a head on how the two
embeddings compare. The comparisons (`model.comparison`, any of them, concatenated in the order given):

    abs_diff  |a - b|                 concat  [a, b]                  product  a * b
    cosine    cos(a, b), one value    l2      ||a - b||, one value    residual  (a residual block on the fused
                                                                                 features; not a feature itself)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from distrain.tasks.base import COMPARISONS


class SiameseNet(nn.Module):
    """[B, 2C, H, W] (a pair stacked on channels) -> logits [B, num_classes]. `encoder`: a network giving pooled
    embeddings [N, D] (a timm model built with num_classes=0; its `num_features` is D). Both images go through the
    encoder as one batch of 2B, so BatchNorm sees both and the encoder's weights are shared by construction."""

    def __init__(self, encoder: nn.Module, num_classes: int, comparison: tuple[str, ...] = ("abs_diff", "product")):
        super().__init__()
        unknown = [c for c in comparison if c not in COMPARISONS]
        features = [c for c in comparison if c != "residual"]
        if unknown or not features:
            raise ValueError(f"comparison {list(comparison)}: choose from {list(COMPARISONS)}, at least one feature")
        self.encoder, self.comparison = encoder, tuple(features)
        width = embedding_width(encoder)
        fused = sum(
            {"abs_diff": width, "concat": 2 * width, "product": width, "cosine": 1, "l2": 1}[c] for c in features
        )
        hidden = max(64, min(512, width))
        self.fuse = nn.Sequential(nn.Linear(fused, hidden), nn.GELU())
        self.residual = (nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, hidden), nn.GELU())
                         if "residual" in comparison else None)  # fmt: skip
        self.head = nn.Linear(hidden, num_classes)
        self.pretrained_cfg = getattr(encoder, "pretrained_cfg", None)  # the encoder's data config serves the pair

    def forward(self, pair: torch.Tensor) -> torch.Tensor:
        c = pair.shape[1] // 2
        a, b = self.encoder(torch.cat([pair[:, :c], pair[:, c:]], dim=0)).flatten(1).float().chunk(2, dim=0)
        parts = {
            "abs_diff": lambda: (a - b).abs(),
            "concat": lambda: torch.cat([a, b], dim=1),
            "product": lambda: a * b,
            "cosine": lambda: F.cosine_similarity(a, b, dim=1, eps=1e-6)[:, None],
            "l2": lambda: (a - b).pow(2).sum(dim=1, keepdim=True).add(1e-12).sqrt(),
        }
        h = self.fuse(torch.cat([parts[name]() for name in self.comparison], dim=1))
        if self.residual is not None:
            h = h + self.residual(h)
        return self.head(h)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """The encoder's (timm's), where it has it: the head is small."""
        if hasattr(self.encoder, "set_grad_checkpointing"):
            self.encoder.set_grad_checkpointing(enable)


def embedding_width(encoder: nn.Module) -> int:
    """D of the encoder's pooled embeddings: its `num_features` (timm's models have it)."""
    width = getattr(encoder, "num_features", None)
    if isinstance(width, int) and width > 0:
        return width
    raise ValueError(
        f"{type(encoder).__name__} has no `num_features`: build it with num_classes=0 (timm) or give it one"
    )
