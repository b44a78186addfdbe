"""The one place a single-device model becomes trainable on the process group, in a fixed order.

Gradient checkpointing first (it rewrites module forwards, which compile must then trace), then
torch.compile (it must see the checkpointed forwards and no DDP hooks), then the data-parallel
wrapper: DDP through accelerate.prepare, or DeepSpeed ZeRO, which compiles the module inside its
engine instead (a torch.compile wrapper in front of the engine breaks ZeRO-3's hooks).
"""

from __future__ import annotations

import copy
import os

import torch
from accelerate import Accelerator

from distrain.config import TrainConfig
from distrain.distributed.base import Trainable
from distrain.distributed.checkpointing import apply_grad_checkpointing
from distrain.distributed.ddp import DDPModel
from distrain.distributed.runtime import accelerate_uses_deepspeed, deepspeed_config


def wrap(
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    train: TrainConfig,
    *,
    grad_checkpointing: bool = False,
) -> Trainable:
    """Make a single-device model trainable on this process group, in a fixed order: gradient
    checkpointing -> torch.compile -> DDP (accelerate.prepare), or gradient checkpointing -> DeepSpeed
    ZeRO, which then compiles the module in its engine. Returns a DDPModel or a zero.ZeroModel; both keep
    the uncompiled single-device module as `.single` for state dicts.
    The LR scheduler is deliberately not prepared: accelerate's wrapper steps it once per process,
    which would shorten the schedule by world size."""
    ds_config = deepspeed_config(
        train, accelerator.num_processes if not accelerate_uses_deepspeed() else int(os.environ.get("WORLD_SIZE", "1"))
    )
    wrapping = ""
    if train.channels_last and accelerator.device.type == "cuda":  # in place: `single` shares the parameters
        model = model.to(memory_format=torch.channels_last)
        wrapping += ", channels-last"
    single = model
    plain = copy.deepcopy(model) if ds_config is not None else None  # before checkpointing / compile hooks
    if grad_checkpointing:
        wrapping += f", gradient checkpointing ({apply_grad_checkpointing(model)})"
    if train.compile:
        wrapping += f", torch.compile ({train.compile_backend})"
    if ds_config is not None:
        from distrain.distributed.zero import create_zero_model

        # DeepSpeed compiles the module inside its engine (`engine.compile`, in place): its ZeRO hooks
        # and checkpoint keys then stay those of the plain module, where a torch.compile wrapper in
        # front of the engine breaks ZeRO-3's forward hooks and prefixes every key with `_orig_mod.`.
        trainable = create_zero_model(
            single,
            plain,
            optimizer,
            ds_config,
            accelerator if accelerate_uses_deepspeed() else None,
            compile_backend=train.compile_backend if train.compile else None,
        )
    else:
        if train.compile:
            model = torch.compile(model, backend=train.compile_backend)
        model, optimizer = accelerator.prepare(model, optimizer)
        trainable = DDPModel(accelerator, model, optimizer, single, train)
    trainable.wrapping = wrapping
    return trainable
