"""Run the main job under `accelerate launch --multi_gpu --num_processes 2` (CPU, gloo) with every Python-level
collective counted while an epoch trains (DDP's gradient all-reduce runs in its C++ reducer and is not counted: it
is the one collective a step needs). Writes <out>/rank<r>.json: optimizer steps and collectives per epoch."""

import json
import sys
from pathlib import Path

import torch.distributed as dist

from distrain import run
from distrain.training import loop

out = Path(sys.argv[1])
counts = {"collectives": 0, "in_epoch": False}
epochs = []


def counted(fn):
    def wrapper(*args, **kwargs):
        if counts["in_epoch"]:
            counts["collectives"] += 1
        return fn(*args, **kwargs)

    return wrapper


for name in ("all_reduce", "all_gather", "all_gather_object", "broadcast", "broadcast_object_list", "gather_object"):
    setattr(dist, name, counted(getattr(dist, name)))
train_epoch = loop.JobTrainer.train_epoch


def counting_epoch(self, epoch):
    counts.update(collectives=0, in_epoch=True)
    try:
        return train_epoch(self, epoch)
    finally:
        counts["in_epoch"] = False
        steps = self.epoch_steps[epoch] // self.cfg.train.grad_accum_steps
        epochs.append({"epoch": epoch, "optimizer_steps": steps, "collectives": counts["collectives"]})
        rank = dist.get_rank() if dist.is_initialized() else 0
        (out / f"rank{rank}.json").write_text(json.dumps(epochs))


loop.JobTrainer.train_epoch = counting_epoch
sys.exit(run.main(sys.argv[2:]))
