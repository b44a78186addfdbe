"""The DBNet network on any timm backbone built with `features_only=True` (resnet50, efficientnet_b4, hrnet_w44,
convnext_tiny, or your factory's module with a timm-style `feature_info`): the stride-4..32 feature maps go
through an FPN neck (MMOCR's FPNC: lateral 1x1 convs, top-down sum, 3x3 smoothing, all upsampled to stride 4 and
concatenated), then the DB head's two branches (conv, two transposed convs back to the input size) give the
probability map P and the threshold map T, and the approximate binary map B = 1 / (1 + exp(-k (P - T))), k = 50
(differentiable binarization, Liao et al. 2020).
"""

from __future__ import annotations

import torch
from torch import nn

from distrain.tasks.necks import FPN, check_input_size, conv_bn_relu, fpn_levels

DB_K = 50.0


class DBBranch(nn.Sequential):
    """[B, C, H/4, W/4] -> [B, 1, H, W] logits: 3x3 conv, then two stride-2 transposed convs."""

    def __init__(self, channels: int):
        quarter = channels // 4
        super().__init__(
            conv_bn_relu(channels, quarter, 3),
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
        self.levels, channels = fpn_levels(backbone)
        self.backbone, self.k = backbone, k
        self.neck = FPN(channels, inner)
        self.probability, self.threshold = DBBranch(inner), DBBranch(inner)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        check_input_size(images)
        features = self.backbone(images)
        fused = self.neck([features[i] for i in self.levels])
        prob, thresh = self.probability(fused).sigmoid(), self.threshold(fused).sigmoid()
        binary = torch.sigmoid(self.k * (prob - thresh))
        return torch.cat([prob, thresh, binary], dim=1)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Checkpoint the backbone's blocks where timm supports it (the neck and head are small)."""
        if hasattr(self.backbone, "set_grad_checkpointing"):
            self.backbone.set_grad_checkpointing(enable)
