"""A tiny CNN for small images (16-32 px digits), as a model factory: `model.names: [examples.smallnet:build]`.

distrain calls `build(num_classes=..., in_chans=..., **kwargs)`: kwargs are `drop_rate` / `drop_path_rate` when the
config sets them, then `model.factory_args["examples.smallnet:build"]` (here `width`). The optional
`pretrained_cfg` is what timm's own models carry; distrain reads its preprocessing from it where `data:` does not
set it, and its `classifier` names the layer that a `model.pretrained_file` with another number of classes may
leave to the factory.
"""

from __future__ import annotations

from torch import nn


def _conv_bn(in_chans: int, out_chans: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_chans, out_chans, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_chans),
        nn.ReLU(inplace=True),
    )


class SmallNet(nn.Module):
    """stem (full resolution) -> two stages, each halving the resolution -> global average pool -> dropout -> fc.
    Any input size of 4 px and up: the pooling is global."""

    pretrained_cfg = {"mean": (0.5,), "std": (0.5,), "interpolation": "bilinear", "crop_pct": 1.0, "classifier": "fc"}

    def __init__(self, num_classes: int, in_chans: int, width: int = 16, drop_rate: float = 0.0):
        super().__init__()
        self.stem = _conv_bn(in_chans, width)
        # top-level stages with their own sub-modules: what gradient checkpointing wraps (no timm hook here)
        self.stage1 = nn.Sequential(_conv_bn(width, 2 * width, stride=2), _conv_bn(2 * width, 2 * width))
        self.stage2 = nn.Sequential(_conv_bn(2 * width, 4 * width, stride=2), _conv_bn(4 * width, 4 * width))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(drop_rate)  # always present, so the state dict does not depend on drop_rate
        self.fc = nn.Linear(4 * width, num_classes)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def forward(self, x):
        x = self.stage2(self.stage1(self.stem(x)))
        return self.fc(self.drop(self.pool(x).flatten(1)))


def build(num_classes: int, in_chans: int, width: int = 16, drop_rate: float = 0.0, **_) -> SmallNet:
    """The factory distrain calls; other settings it may pass (drop_path_rate) do not apply to this network."""
    return SmallNet(num_classes, in_chans, width=width, drop_rate=drop_rate)
