"""A pair network of one's own, as the practitioners' notes build them (a "Fusion" net with squeeze-and-excitation
attention), given to distrain as a factory: `model.names: [examples.pairnet:build]` with
`model.overrides: {examples.pairnet:build: {model.comparison: []}}`, so that it receives the pair itself.

distrain calls `build(num_classes=..., in_chans=2C, **kwargs)` and feeds [B, 2C, H, W]: the pair's two images
stacked on channels. The network encodes each half with one shared CNN (with SE attention), then fuses the two
embeddings every way the notes list (|a-b|, a*b, [a, b], cosine, L2 distance) through a residual MLP.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from examples.smallnet import _conv_bn


class SqueezeExcite(nn.Module):
    """Channel attention: each channel scaled by a gate computed from the pooled channels."""

    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        self.gate = nn.Sequential(nn.Linear(channels, channels // reduction), nn.ReLU(inplace=True),
                                  nn.Linear(channels // reduction, channels), nn.Sigmoid())  # fmt: skip

    def forward(self, x):
        return x * self.gate(x.mean(dim=(2, 3)))[:, :, None, None]


class FusionPairNet(nn.Module):
    """Shared encoder (stem, two SE stages, pooled) -> fused comparisons -> residual MLP -> logits."""

    pretrained_cfg = {"mean": (0.5,), "std": (0.5,), "interpolation": "bilinear", "crop_pct": 1.0, "classifier": "head"}

    def __init__(self, num_classes: int, in_chans: int, width: int = 16, drop_rate: float = 0.0):
        super().__init__()
        if in_chans % 2:
            raise ValueError(f"in_chans={in_chans}: a pair's two images stacked on channels (set model.comparison: [])")
        c, d = in_chans // 2, 4 * width
        self.encoder = nn.Sequential(_conv_bn(c, width), _conv_bn(width, 2 * width, stride=2),
                                     SqueezeExcite(2 * width), _conv_bn(2 * width, d, stride=2), SqueezeExcite(d),
                                     nn.AdaptiveAvgPool2d(1), nn.Flatten())  # fmt: skip
        self.fuse = nn.Sequential(nn.Linear(4 * d + 2, d), nn.GELU())
        self.residual = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, d), nn.GELU(), nn.Dropout(drop_rate))
        self.head = nn.Linear(d, num_classes)

    def get_classifier(self) -> nn.Module:
        return self.head

    def forward(self, pair: torch.Tensor) -> torch.Tensor:
        c = pair.shape[1] // 2
        a, b = self.encoder(torch.cat([pair[:, :c], pair[:, c:]], dim=0)).chunk(2, dim=0)
        cosine = F.cosine_similarity(a, b, dim=1, eps=1e-6)[:, None]
        distance = (a - b).pow(2).sum(dim=1, keepdim=True).add(1e-12).sqrt()
        h = self.fuse(torch.cat([(a - b).abs(), a * b, a, b, cosine, distance], dim=1))
        return self.head(h + self.residual(h))


def build(num_classes: int, in_chans: int, width: int = 16, drop_rate: float = 0.0, **_) -> FusionPairNet:
    """The factory distrain calls; drop_path_rate, if passed, does not apply to this network."""
    return FusionPairNet(num_classes, in_chans, width=width, drop_rate=drop_rate)
