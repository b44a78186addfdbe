"""Single-device model construction: timm by name, pretrained=False, optional gradient checkpointing.

Nothing here knows about ranks or wrappers; `parallel.py` wraps what this returns.
"""
from __future__ import annotations

import timm
import torch


def create_model(name: str, *, num_classes: int, in_chans: int, drop_rate: float = 0.0,
                 grad_checkpointing: bool = False) -> torch.nn.Module:
    """A timm classifier with random init. Raises ValueError if checkpointing is asked of a model without it."""
    model = timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans,
                              drop_rate=drop_rate)
    if grad_checkpointing:
        try:
            model.set_grad_checkpointing(True)
        except (AttributeError, NotImplementedError, AssertionError) as e:
            raise ValueError(f"model {name!r} does not support gradient checkpointing ({e})") from None
    return model
