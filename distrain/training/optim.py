"""Optimizer and learning-rate schedule factories.

The schedules encode the practice distrain grew from: late, low learning rates widened one team's
train-val gap from -0.7% to +9.3%; warm restarts (SGDR) and an LR floor (`min_lr_ratio`) fixed it.
"""

from __future__ import annotations

import math

import torch

from distrain.config import OptimConfig, timm_optim

FUSABLE = ("adamw", "adam")
"""timm names of optimizers that are torch's own and take `fused=True`."""


def create_optimizer(model: torch.nn.Module, cfg: OptimConfig, fused: bool = False) -> torch.optim.Optimizer:
    """timm's `create_optimizer_v2`: `optim.name` (AdamW by default; `sgd` is SGD with Nesterov momentum),
    no weight decay on biases, norm weights and the model's `no_weight_decay()` parameters, and with
    `optim.layer_decay` layer-wise learning rates (each group's `lr_scale`, from the model's group_matcher).
    The scale is applied to each group's lr here, since the LambdaLR schedule multiplies the lr it finds.
    `fused`: torch's fused kernel, for the optimizers that have one (`FUSABLE`; others ignore it)."""
    extra = {"fused": True} if fused and cfg.name.lower() in FUSABLE else {}
    optimizer = timm_optim().create_optimizer_v2(model, opt=cfg.name, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                    momentum=cfg.momentum, layer_decay=cfg.layer_decay or None, **extra)  # fmt: skip
    for group in optimizer.param_groups:
        group["lr"] = cfg.lr * group.get("lr_scale", 1.0)
    return optimizer


def lr_factor(step: int, *, total_steps: int, steps_per_epoch: int, cfg: OptimConfig) -> float:
    """Multiplier of the peak LR at optimizer step `step` (0-based): linear warmup, then the schedule."""
    warmup = int(cfg.warmup_fraction * total_steps)
    if step < warmup:
        return (step + 1) / warmup
    if cfg.schedule == "constant":
        return 1.0
    floor = cfg.min_lr_ratio
    t = step - warmup
    if cfg.schedule == "cosine":
        span = max(1, total_steps - warmup)
        progress = min(1.0, t / span)
    else:  # cosine_restarts: cycles of T_0, T_0*mult, ... steps; LR jumps back to peak at each start
        epochs = max(1, total_steps // max(1, steps_per_epoch))
        cycle = (cfg.restart_epochs or max(1, epochs // 4)) * steps_per_epoch
        while t >= cycle:
            t -= cycle
            cycle *= cfg.restart_mult
        progress = t / cycle
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def create_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, *, total_steps: int, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR stepped once per optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps=total_steps, steps_per_epoch=steps_per_epoch, cfg=cfg)
    )
