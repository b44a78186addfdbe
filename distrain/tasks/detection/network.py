"""The DBNet network on any timm backbone built with `features_only=True` (resnet50, efficientnet_b4, hrnet_w44,
convnext_tiny, or your factory's module with a timm-style `feature_info`): the stride-4..32 feature maps go
through an FPN neck (MMOCR's FPNC: lateral 1x1 convs, top-down sum, 3x3 smoothing, all upsampled to stride 4 and
concatenated), then the DB head's two branches (conv, two transposed convs back to the input size) give the
probability map P and the threshold map T, and the approximate binary map B = 1 / (1 + exp(-k (P - T))), k = 50
(differentiable binarization, Liao et al. 2020).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

DB_K = 50.0
FPN_STRIDES = (4, 8, 16, 32)


def _conv_bn_relu(cin: int, cout: int, kernel: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))  # fmt: skip


class FPN(nn.Module):
    """Feature maps at strides 4, 8, 16, 32 -> one [B, inner, H/4, W/4] map (four inner/4 maps concatenated)."""

    def __init__(self, in_channels: list[int], inner: int = 256):
        super().__init__()
        if inner % 4:
            raise ValueError(f"the FPN's inner channels must be divisible by 4, got {inner}")
        self.lateral = nn.ModuleList(nn.Conv2d(c, inner, 1, bias=False) for c in in_channels)
        self.smooth = nn.ModuleList(_conv_bn_relu(inner, inner // 4, 3) for _ in in_channels)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        laterals = [conv(f) for conv, f in zip(self.lateral, features)]
        for i in range(len(laterals) - 1, 0, -1):  # top-down: each coarser map added to the next finer one
            laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[-2:],
                                                              mode="nearest")  # fmt: skip
        size = laterals[0].shape[-2:]
        outs = [smooth(x) for smooth, x in zip(self.smooth, laterals)]
        return torch.cat([outs[0], *(F.interpolate(o, size=size, mode="nearest") for o in outs[1:])], dim=1)


class DBBranch(nn.Sequential):
    """[B, C, H/4, W/4] -> [B, 1, H, W] logits: 3x3 conv, then two stride-2 transposed convs."""

    def __init__(self, channels: int):
        quarter = channels // 4
        super().__init__(
            _conv_bn_relu(channels, quarter, 3),
            nn.ConvTranspose2d(quarter, quarter, 2, stride=2),
            nn.BatchNorm2d(quarter),
            nn.ReLU(inplace=True),
            nn.ConvTranspose2d(quarter, 1, 2, stride=2),
        )


class DBNet(nn.Module):
    """[B, C, H, W] images -> [B, 3, H, W]: probability map P, threshold map T, approximate binary map B (all in
    0..1). H and W must be multiples of 32. `backbone`: a `features_only` module whose `feature_info.reduction()`
    includes 4, 8, 16 and 32 (other levels, such as stride 2, are computed and left unused)."""

    def __init__(self, backbone: nn.Module, inner: int = 256, k: float = DB_K):
        super().__init__()
        reductions = list(backbone.feature_info.reduction())
        missing = [s for s in FPN_STRIDES if s not in reductions]
        if missing:
            raise ValueError(f"a DB backbone needs feature maps at strides {FPN_STRIDES}; it has {reductions}")
        self.levels = [reductions.index(s) for s in FPN_STRIDES]
        channels = list(backbone.feature_info.channels())
        self.backbone, self.k = backbone, k
        self.neck = FPN([channels[i] for i in self.levels], inner)
        self.probability, self.threshold = DBBranch(inner), DBBranch(inner)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-1] % 32 or images.shape[-2] % 32:
            raise ValueError(f"DBNet needs image sides that are multiples of 32, got {tuple(images.shape[-2:])}")
        features = self.backbone(images)
        fused = self.neck([features[i] for i in self.levels])
        prob, thresh = self.probability(fused).sigmoid(), self.threshold(fused).sigmoid()
        binary = torch.sigmoid(self.k * (prob - thresh))
        return torch.cat([prob, thresh, binary], dim=1)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Checkpoint the backbone's blocks where timm supports it (the neck and head are small)."""
        if hasattr(self.backbone, "set_grad_checkpointing"):
            self.backbone.set_grad_checkpointing(enable)
