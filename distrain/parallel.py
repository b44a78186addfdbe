"""Everything that knows about processes, devices and wrappers lives here.

- `create_accelerator`: the precision policy checked against the device, then one Accelerator per
  process (DDP over NCCL on GPUs, over gloo on CPU when started with `--multi_gpu`).
- `wrap`: single-device model + optimizer -> DDP-wrapped (accelerate.prepare), in one place.
- `on_primary`: run a step on one rank while the others wait, re-raising its error on every rank
  (a plain barrier would leave the other ranks hanging forever when the primary fails).
- `gather_rows`: variable-length per-rank results gathered to every rank, without the padding
  duplicates that a DistributedSampler or `gather_for_metrics` would otherwise need to drop.
"""
from __future__ import annotations

import os
from typing import Any, Callable, TypeVar

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed

from distrain.config import ConfigError, TrainConfig

T = TypeVar("T")


def check_precision(precision: str, cuda: bool) -> None:
    """Refuse precisions the device cannot run, rather than silently training in fp32."""
    if precision == "fp16" and not cuda:
        raise ConfigError("train.precision: 'fp16' needs a CUDA GPU (on CPU accelerate would silently train "
                          "in fp32); use 'bf16' or 'no' on CPU")
    if precision == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise ConfigError("train.precision: 'bf16' is not supported by this GPU; use 'fp16' or 'no'")


def create_accelerator(train: TrainConfig) -> Accelerator:
    """One Accelerator for the whole process (it owns the process group); reused by every job."""
    cuda = torch.cuda.is_available()
    check_precision(train.precision, cuda)
    if train.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for determinism
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    accelerator = Accelerator(cpu=not cuda, mixed_precision=train.precision,
                              gradient_accumulation_steps=train.grad_accum_steps)
    if not cuda:
        # `accelerate launch` exports OMP_NUM_THREADS=1; on CPU that idles all cores but one.
        local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
        torch.set_num_threads(train.cpu_threads or max(1, (os.cpu_count() or 1) // max(1, local_processes)))
    return accelerator


def wrap(accelerator: Accelerator, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
    """Place and wrap for data parallelism. The LR scheduler is deliberately not prepared:
    accelerate's wrapper steps it once per process, which would shorten the schedule by world size."""
    return accelerator.prepare(model, optimizer)


def seed_everything(seed: int, *, per_rank: bool = False) -> None:
    """Seed Python, numpy and torch; per_rank adds the process index, for distinct augmentation streams."""
    set_seed(seed, device_specific=per_rank)


def release(accelerator: Accelerator) -> None:
    """Drop accelerate's references to the last job's model and optimizer."""
    accelerator.free_memory()


def on_primary(accelerator: Accelerator, fn: Callable[[], T], *, per_node: bool = False) -> T:
    """Run `fn` on rank 0 (or on each node's local rank 0) while the others wait; return rank 0's
    result on every rank. An exception in `fn` is raised on every rank, with the same message."""
    runs_here = accelerator.is_local_main_process if per_node else accelerator.is_main_process
    outcome: tuple[Any, str, str] = (None, "", "")
    if runs_here:
        try:
            outcome = (fn(), "", "")
        except Exception as e:  # re-raised below, on every rank
            outcome = (None, type(e).__name__, str(e))
    if accelerator.num_processes == 1:
        results = [outcome]
    else:
        results = gather_object([outcome])
    for _, err_type, message in results:
        if err_type:
            raise _rebuild_error(err_type, message)
    return results[0][0]


def _rebuild_error(err_type: str, message: str) -> Exception:
    from distrain.data import DataError
    from distrain.ensemble import EnsembleError
    from distrain.folds import FoldManifestMismatch

    known = {c.__name__: c for c in (ConfigError, DataError, FoldManifestMismatch, EnsembleError, ValueError,
                                     FileNotFoundError)}
    return known.get(err_type, RuntimeError)(message)


def gather_rows(accelerator: Accelerator, rows: list) -> list:
    """Concatenate every rank's list of rows, in rank order, on every rank."""
    if accelerator.num_processes == 1:
        return list(rows)
    return gather_object(rows)


def sum_across_ranks(accelerator: Accelerator, values: list[float]) -> list[float]:
    """Element-wise sum of a few scalars over all ranks."""
    t = torch.tensor(values, dtype=torch.float64, device=accelerator.device)
    return accelerator.reduce(t, reduction="sum").tolist()
