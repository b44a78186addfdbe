"""The feature pyramid that dense heads (text detection, segmentation) share: a timm `features_only` backbone's
stride-4..32 maps fused into one stride-4 map (MMOCR's FPNC: lateral 1x1 convs, a top-down sum, 3x3 smoothing,
all upsampled to stride 4 and concatenated)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FPN_STRIDES = (4, 8, 16, 32)


def fpn_levels(backbone: nn.Module) -> tuple[list[int], list[int]]:
    """Which of a `features_only` backbone's outputs are at strides 4, 8, 16, 32, and their channels (other
    levels, such as stride 2, are computed and left unused)."""
    reductions = list(backbone.feature_info.reduction())
    if any(s not in reductions for s in FPN_STRIDES):
        raise ValueError(f"a dense backbone needs feature maps at strides {FPN_STRIDES}; it has {reductions}")
    levels = [reductions.index(s) for s in FPN_STRIDES]
    channels = list(backbone.feature_info.channels())
    return levels, [channels[i] for i in levels]


def check_input_size(images: torch.Tensor) -> None:
    """Dense networks take image sides that are multiples of 32 (the coarsest level's stride)."""
    if images.shape[-1] % 32 or images.shape[-2] % 32:
        raise ValueError(f"dense networks need image sides that are multiples of 32, got {tuple(images.shape[-2:])}")


def conv_bn_relu(cin: int, cout: int, kernel: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))  # fmt: skip


class FPN(nn.Module):
    """Feature maps at strides 4, 8, 16, 32 -> one [B, inner, H/4, W/4] map (four inner/4 maps concatenated)."""

    def __init__(self, in_channels: list[int], inner: int = 256):
        super().__init__()
        if inner % 4:
            raise ValueError(f"the FPN's inner channels must be divisible by 4, got {inner}")
        self.lateral = nn.ModuleList(nn.Conv2d(c, inner, 1, bias=False) for c in in_channels)
        self.smooth = nn.ModuleList(conv_bn_relu(inner, inner // 4, 3) for _ in in_channels)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        laterals = [conv(f) for conv, f in zip(self.lateral, features)]
        for i in range(len(laterals) - 1, 0, -1):  # top-down: each coarser map added to the next finer one
            laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[-2:],
                                                              mode="nearest")  # fmt: skip
        size = laterals[0].shape[-2:]
        outs = [smooth(x) for smooth, x in zip(self.smooth, laterals)]
        return torch.cat([outs[0], *(F.interpolate(o, size=size, mode="nearest") for o in outs[1:])], dim=1)
