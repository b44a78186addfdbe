"""Single-device model construction: timm by name, pretrained=False, and gradient checkpointing.

Nothing here knows about ranks or wrappers; `parallel.wrap` applies checkpointing, compile and the
data-parallel wrapper to what `create_model` returns, in that order.
"""
from __future__ import annotations

import timm
import torch
from torch.utils.checkpoint import checkpoint


def create_model(name: str, *, num_classes: int, in_chans: int, drop_rate: float = 0.0) -> torch.nn.Module:
    """A timm classifier with random init."""
    return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans, drop_rate=drop_rate)


def apply_grad_checkpointing(model: torch.nn.Module) -> str:
    """Recompute activations in the backward pass instead of storing them. Uses timm's
    `set_grad_checkpointing` where the model implements it ("timm"); otherwise wraps each top-level
    stage (a child module that has sub-modules and is not the classifier) in torch.utils.checkpoint
    ("stages"). Raises ValueError for a model that offers neither."""
    try:
        model.set_grad_checkpointing(True)
        return "timm"
    except (AttributeError, NotImplementedError, AssertionError):
        pass
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    stages = [child for child in model.children()
              if child is not head and any(True for _ in child.children()) and any(True for _ in child.parameters())]
    if not stages:
        raise ValueError(f"model {type(model).__name__} supports no gradient checkpointing: timm's "
                         f"set_grad_checkpointing is missing and it has no top-level stages to wrap")
    for stage in stages:
        _checkpoint_forward(stage)
    return "stages"


def check_grad_checkpointing(name: str) -> str:
    """Which checkpointing `name` would get ("timm" or "stages"), found on a weightless meta-device copy
    so that a model offering neither is refused before any work. Raises ValueError."""
    try:
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False, num_classes=2)
    except Exception:  # a model whose constructor computes on tensors cannot be built on meta: build it
        model = timm.create_model(name, pretrained=False, num_classes=2)
    try:
        return apply_grad_checkpointing(model)
    except ValueError as e:
        raise ValueError(f"model.names: {name!r}: {e}; set model.grad_checkpointing=false") from None


def _checkpoint_forward(module: torch.nn.Module) -> None:
    """Make `module` recompute its forward during backward when training with grad enabled."""
    inner = module.forward

    def forward(*args, **kwargs):
        if module.training and torch.is_grad_enabled():
            # Non-reentrant: works with inputs that do not require grad and with DDP / ZeRO hooks.
            return checkpoint(inner, *args, use_reentrant=False, **kwargs)
        return inner(*args, **kwargs)

    module.forward = forward
