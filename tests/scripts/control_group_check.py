"""Run under `accelerate launch --multi_gpu --num_processes 2` (CPU, gloo) with train.collective_timeout_s = 2:
rank-0-only work of 5 s (longer than that timeout) completes on every rank, because the others wait on the control
group; a training collective that one rank leaves waiting longer than the timeout fails within its bound."""

import json
import sys
import time
from pathlib import Path

import torch

from distrain.config import TrainConfig
from distrain.distributed import runtime

out = Path(sys.argv[1])
acc = runtime.create_accelerator(TrainConfig(collective_timeout_s=2.0, control_timeout_s=60.0))
rank = acc.process_index
started = time.monotonic()
result = runtime.on_primary(acc, lambda: (time.sleep(5.0), "aggregated")[1])
waited = time.monotonic() - started
total = runtime.sum_across_ranks(acc, [1.0])[0]  # the training group still works afterwards
started, error = time.monotonic(), ""
try:
    if rank == 0:
        time.sleep(6.0)  # rank 1 is left alone in an all-reduce: it must give up after about 2 s
    else:
        torch.distributed.all_reduce(torch.ones(1))
except Exception as e:
    error = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
stalled = time.monotonic() - started
(out / f"rank{rank}.json").write_text(json.dumps({"result": result, "waited": waited, "total": total,
                                                  "stalled": stalled, "error": error}))  # fmt: skip
sys.stdout.flush()
import os  # noqa: E402

os._exit(0)  # the training group is broken on purpose: leave without tearing it down
