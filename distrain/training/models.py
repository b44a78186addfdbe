"""Single-device model construction: timm by name.

Nothing here knows about ranks or wrappers; `distributed.wrap` applies gradient checkpointing, compile
and the data-parallel wrapper to what `create_model` returns, in that order.
"""

from __future__ import annotations

import timm
import torch


def create_model(name: str, *, num_classes: int, in_chans: int, drop_rate: float = 0.0) -> torch.nn.Module:
    """A timm classifier with random init."""
    return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans, drop_rate=drop_rate)
