"""The process group and its collectives.

- `create_accelerator`: the precision policy checked against the device (and against the DeepSpeed JSON,
  if any), then one Accelerator per process (DDP over NCCL on GPUs, over gloo on CPU when started with
  `--multi_gpu` or torchrun; accelerate's DeepSpeed plugin under `accelerate launch` with a DeepSpeed YAML).
- `on_primary`: run a step on one rank while the others wait, re-raising its error on every rank
  (a plain barrier would leave the other ranks hanging forever when the primary fails). They wait on a gloo
  control group with its own timeout (`train.control_timeout_s`), so rank-0 work longer than the training
  collectives' timeout (`train.collective_timeout_s`) never aborts them.
- `gather_rows`: variable-length per-rank results gathered to every rank, without the padding
  duplicates that a DistributedSampler or `gather_for_metrics` would otherwise need to drop.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional, TypeVar

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, gather_object, set_seed

from distrain.config import TrainConfig
from distrain.distributed.cpus import available_cpus
from distrain.errors import ConfigError

T = TypeVar("T")


def check_precision(precision: str, cuda: bool) -> None:
    """Refuse precisions the device cannot run, rather than silently training in fp32."""
    if precision == "fp16" and not cuda:
        raise ConfigError(
            "train.precision: 'fp16' needs a CUDA GPU (on CPU accelerate would silently train "
            "in fp32); use 'bf16' or 'no' on CPU"
        )
    if precision == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise ConfigError("train.precision: 'bf16' is not supported by this GPU; use 'fp16' or 'no'")


def accelerate_uses_deepspeed() -> bool:
    """Started by `accelerate launch` with a DeepSpeed YAML (accelerate exports this)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true", "yes")


def deepspeed_config_path(train: TrainConfig) -> str:
    """The DeepSpeed JSON to use: train.deepspeed, or the one accelerate's DeepSpeed YAML names; '' for DDP."""
    from_launcher = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "") if accelerate_uses_deepspeed() else ""
    if from_launcher and train.deepspeed and Path(from_launcher).resolve() != Path(train.deepspeed).resolve():
        raise ConfigError(
            f"train.deepspeed={train.deepspeed!r} disagrees with the launcher's DeepSpeed config "
            f"{from_launcher!r}; set one of them"
        )
    if accelerate_uses_deepspeed() and not (from_launcher or train.deepspeed):
        raise ConfigError(
            "accelerate launch uses DeepSpeed but names no deepspeed_config_file; "
            "use launch/accelerate/deepspeed_zero2.yaml or set train.deepspeed"
        )
    return train.deepspeed or from_launcher


def deepspeed_config(train: TrainConfig, world_size: int) -> Optional[dict]:
    """The resolved, checked DeepSpeed config, or None when training with DDP. Raises ConfigError."""
    path = deepspeed_config_path(train)
    if not path:
        return None
    from distrain.distributed.zero import load_deepspeed_config

    return load_deepspeed_config(path, train, world_size)


def create_accelerator(train: TrainConfig) -> Accelerator:
    """One Accelerator for the whole process (it owns the process group); reused by every job.
    Raises ConfigError, before any training, for a precision the device cannot run or a DeepSpeed
    config that disagrees with `train`."""
    cuda = torch.cuda.is_available()
    check_precision(train.precision, cuda)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    ds_config = deepspeed_config(train, world_size)  # fail before any process group work
    if ds_config is not None:
        from distrain.distributed.zero import prepare_runtime

        prepare_runtime()
    if train.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for determinism
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    if accelerate_uses_deepspeed():
        from accelerate.utils import DeepSpeedPlugin

        # Hand accelerate the config with "auto" already resolved and checked by distrain, so the plugin
        # needs no dataloader to infer batch sizes. (On CPU accelerate's DeepSpeed state is single-process;
        # use torchrun or the deepspeed launcher there, which take the direct path below.)
        accelerator = Accelerator(
            mixed_precision=train.precision, deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=ds_config),
            kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=train.collective_timeout_s))],
        )  # fmt: skip
    else:
        accelerator = Accelerator(
            cpu=not cuda, mixed_precision=train.precision, gradient_accumulation_steps=train.grad_accum_steps,
            kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=train.collective_timeout_s))],
        )  # fmt: skip
    _open_control_group(accelerator, train.control_timeout_s)
    if cuda:
        apply_cuda_speed_settings(train)
    if not cuda:
        # `accelerate launch` exports OMP_NUM_THREADS=1; on CPU that idles all cores but one.
        torch.set_num_threads(train.cpu_threads or cpus_per_process(accelerator))
    return accelerator


def apply_cuda_speed_settings(train: TrainConfig) -> None:
    """The usual GPU settings, each switchable, none under `train.deterministic` (they pick kernels by timing or
    trade fp32 mantissa bits for tensor-core speed): cuDNN autotuning, TF32 matmuls and convolutions."""
    exact = train.deterministic
    torch.backends.cudnn.benchmark = train.cudnn_benchmark and not exact
    tf32 = train.tf32 and not exact
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    torch.backends.cudnn.allow_tf32 = tf32


_CONTROL_GROUP: list = []  # the gloo group rank-0-only work is waited for on (one per process, like its Accelerator)


def _open_control_group(accelerator: Accelerator, timeout_s: float) -> None:
    """A gloo group over all ranks with its own (long) timeout, for `on_primary`'s wait: on the training group the
    other ranks would abort after `collective_timeout_s` (NCCL's default is 10 minutes) while rank 0 aggregates."""
    _CONTROL_GROUP.clear()
    if accelerator.num_processes > 1 and torch.distributed.is_initialized():
        _CONTROL_GROUP.append(torch.distributed.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s)))


def _gather_on_control_group(obj: Any) -> list:
    """Every rank's `obj`, in rank order, on every rank: over the control group when there is one."""
    if not _CONTROL_GROUP:
        return gather_object([obj])
    out: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj, group=_CONTROL_GROUP[0])
    return out


def cpus_per_process(accelerator: Accelerator) -> int:
    """This process's share of the CPUs it may use (affinity, cgroup quota) among this node's processes."""
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
    return max(1, available_cpus() // max(1, local_processes))


def seed_everything(seed: int, *, per_rank: bool = False) -> None:
    """Seed Python, numpy and torch; per_rank adds the process index, for distinct augmentation streams."""
    set_seed(seed, device_specific=per_rank)


def end_process_group(accelerator: Accelerator) -> None:
    """The end of a worker's work. One process: destroy the process group. Several: a last barrier only, and
    `exit_without_teardown` then ends the process: destroying the gloo groups (or finalising the interpreter
    with them alive) after a resumed ZeRO-3 job aborted one rank in about 1 of 5 runs here ("terminate
    called without an active exception", exit -6), after all work and output were done."""
    if accelerator.num_processes == 1:
        accelerator.end_training()
    else:
        accelerator.wait_for_everyone()


def exit_without_teardown(exit_code: int) -> int:
    """In a launched multi-process worker whose process group is still up (see `end_process_group`): flush
    what was printed and logged, then leave with `exit_code` without interpreter teardown. Otherwise return
    `exit_code` for the caller to exit with."""
    import logging
    import sys

    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return exit_code
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)


def release(accelerator: Accelerator) -> None:
    """Drop accelerate's references to the last job's model and optimizer."""
    accelerator.free_memory()


def on_primary(accelerator: Accelerator, fn: Callable[[], T], *, per_node: bool = False) -> T:
    """Run `fn` on rank 0 (or on each node's local rank 0) while the others wait; return rank 0's
    result on every rank. An exception in `fn` is raised on every rank: the same exception object,
    sent to the others as a pickle (or a RuntimeError with its message if it cannot be pickled)."""
    runs_here = accelerator.is_local_main_process if per_node else accelerator.is_main_process
    outcome: tuple[Any, Optional[BaseException]] = (None, None)
    if runs_here:
        try:
            outcome = (fn(), None)
        except Exception as e:  # re-raised below, on every rank
            outcome = (None, _picklable(e))
    results = [outcome] if accelerator.num_processes == 1 else _gather_on_control_group(outcome)
    for _, error in results:
        if error is not None:
            raise error
    return results[0][0]


def _picklable(error: Exception) -> Exception:
    try:
        pickle.loads(pickle.dumps(error))
        return error.with_traceback(None)
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")


def gather_rows(accelerator: Accelerator, rows: list) -> list:
    """Concatenate every rank's list of rows, in rank order, on every rank."""
    if accelerator.num_processes == 1:
        return list(rows)
    return gather_object(rows)


def agree(accelerator: Accelerator, values: list[float]) -> list[float]:
    """Element-wise sum of a few host-side flags over all ranks, on the CPU control group when there is one: the
    ranks agree without a device synchronisation (`sum_across_ranks` on a GPU copies to and from the device)."""
    if not _CONTROL_GROUP:
        return sum_across_ranks(accelerator, values)
    t = torch.tensor(values, dtype=torch.float64)
    torch.distributed.all_reduce(t, group=_CONTROL_GROUP[0])
    return t.tolist()


def sum_across_ranks(accelerator: Accelerator, values: list[float]) -> list[float]:
    """Element-wise sum of a few scalars over all ranks."""
    t = torch.tensor(values, dtype=torch.float64, device=accelerator.device)
    return accelerator.reduce(t, reduction="sum").tolist()
