"""Everything that knows about processes, devices and wrappers lives here.

- `create_accelerator`: the precision policy checked against the device (and against the DeepSpeed JSON,
  if any), then one Accelerator per process (DDP over NCCL on GPUs, over gloo on CPU when started with
  `--multi_gpu` or torchrun; accelerate's DeepSpeed plugin under `accelerate launch` with a DeepSpeed YAML).
- `wrap`: single-device model + optimizer -> trainable model, always in the order gradient
  checkpointing -> torch.compile -> DDP (accelerate.prepare) or DeepSpeed ZeRO (`zero`), in one place.
- `on_primary`: run a step on one rank while the others wait, re-raising its error on every rank
  (a plain barrier would leave the other ranks hanging forever when the primary fails).
- `gather_rows`: variable-length per-rank results gathered to every rank, without the padding
  duplicates that a DistributedSampler or `gather_for_metrics` would otherwise need to drop.
"""
from __future__ import annotations

import contextlib
import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed

from distrain.config import ConfigError, TrainConfig
from distrain.models import apply_grad_checkpointing

T = TypeVar("T")


def check_precision(precision: str, cuda: bool) -> None:
    """Refuse precisions the device cannot run, rather than silently training in fp32."""
    if precision == "fp16" and not cuda:
        raise ConfigError("train.precision: 'fp16' needs a CUDA GPU (on CPU accelerate would silently train "
                          "in fp32); use 'bf16' or 'no' on CPU")
    if precision == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise ConfigError("train.precision: 'bf16' is not supported by this GPU; use 'fp16' or 'no'")


def accelerate_uses_deepspeed() -> bool:
    """Started by `accelerate launch` with a DeepSpeed YAML (accelerate exports this)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true", "yes")


def deepspeed_config_path(train: TrainConfig) -> str:
    """The DeepSpeed JSON to use: train.deepspeed, or the one accelerate's DeepSpeed YAML names; '' for DDP."""
    from_launcher = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "") if accelerate_uses_deepspeed() else ""
    if from_launcher and train.deepspeed and Path(from_launcher).resolve() != Path(train.deepspeed).resolve():
        raise ConfigError(f"train.deepspeed={train.deepspeed!r} disagrees with the launcher's DeepSpeed config "
                          f"{from_launcher!r}; set one of them")
    if accelerate_uses_deepspeed() and not (from_launcher or train.deepspeed):
        raise ConfigError("accelerate launch uses DeepSpeed but names no deepspeed_config_file; "
                          "use launch/accelerate/deepspeed_zero2.yaml or set train.deepspeed")
    return train.deepspeed or from_launcher


def deepspeed_config(train: TrainConfig, world_size: int) -> Optional[dict]:
    """The resolved, checked DeepSpeed config, or None when training with DDP. Raises ConfigError."""
    path = deepspeed_config_path(train)
    if not path:
        return None
    from distrain.zero import load_deepspeed_config

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
        from distrain.zero import prepare_runtime

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
        accelerator = Accelerator(mixed_precision=train.precision, deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=ds_config))
    else:
        accelerator = Accelerator(cpu=not cuda, mixed_precision=train.precision,
                                  gradient_accumulation_steps=train.grad_accum_steps)
    if not cuda:
        # `accelerate launch` exports OMP_NUM_THREADS=1; on CPU that idles all cores but one.
        local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
        torch.set_num_threads(train.cpu_threads or max(1, (os.cpu_count() or 1) // max(1, local_processes)))
    return accelerator


@dataclass
class StepResult:
    """What one micro-batch did to the optimizer."""

    boundary: bool
    """The accumulation window ended: an optimizer step was due."""
    applied: bool
    """...and was applied (False when fp16 loss scaling found inf/NaN gradients and skipped it)."""
    grad_norm: Optional[torch.Tensor]
    """Global gradient norm before clipping, at a boundary."""


class DDPModel:
    """A model and optimizer prepared by accelerate (DDP over several processes, AMP autocast, fp16
    GradScaler, no_sync during accumulation)."""

    def __init__(self, accelerator: Accelerator, model: torch.nn.Module, optimizer, single: torch.nn.Module,
                 train: TrainConfig):
        self.accelerator, self.model, self.optimizer, self.single = accelerator, model, optimizer, single
        self.plain = single  # evaluation uses the training weights directly
        self.max_norm = train.max_grad_norm if train.max_grad_norm > 0 else float("inf")
        # accelerate's autocast context costs time even when it casts nothing; skip it in fp32.
        self.autocast = accelerator.autocast if train.precision != "no" else contextlib.nullcontext

    wrapping = ""
    """What `wrap` applied before DDP (gradient checkpointing, torch.compile), for `describe`."""

    def describe(self) -> str:
        return ((f"DDP over {self.accelerator.num_processes} processes" if self.accelerator.num_processes > 1
                 else "one process") + f", precision {self.accelerator.mixed_precision}" + self.wrapping)

    def train(self) -> None:
        self.model.train()

    def micro_step(self, images: torch.Tensor, labels: torch.Tensor, criterion):
        """One micro-batch: forward, backward, and at the end of the accumulation window clip and step.
        Returns (loss, logits, StepResult)."""
        acc = self.accelerator
        with acc.accumulate(self.model):
            with self.autocast():
                logits = self.model(images)
            loss = criterion(logits.float(), labels)
            acc.backward(loss)
            boundary = acc.sync_gradients
            norm = acc.clip_grad_norm_(self.model.parameters(), self.max_norm).detach() if boundary else None
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            applied = boundary and not acc.optimizer_step_was_skipped
        return loss, logits, StepResult(boundary, applied, norm)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The single-device model's weights, copied to CPU."""
        return {k: v.detach().to("cpu", copy=True) for k, v in self.single.state_dict().items()}

    def eval_model(self) -> torch.nn.Module:
        return self.single

    def save(self, directory: Path, tag: str) -> dict:
        """Everything goes into the rank-0 checkpoint file (DDP replicas are identical)."""
        scaler = getattr(self.accelerator, "scaler", None)
        return {"model": {k: v.detach().cpu() for k, v in self.single.state_dict().items()},
                "optimizer": self.optimizer.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None}

    def load(self, directory: Path, saved: dict) -> None:
        self.single.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None and saved.get("scaler") is not None:
            scaler.load_state_dict(saved["scaler"])

    @staticmethod
    def prune(directory: Path, keep_tags: set[str]) -> None:
        return None


def wrap(accelerator: Accelerator, model: torch.nn.Module, optimizer: torch.optim.Optimizer, train: TrainConfig,
         *, grad_checkpointing: bool = False):
    """Make a single-device model trainable on this process group, in a fixed order: gradient
    checkpointing -> torch.compile -> DDP (accelerate.prepare), or gradient checkpointing -> DeepSpeed
    ZeRO, which then compiles the module in its engine. Returns a DDPModel or a zero.ZeroModel; both keep
    the uncompiled single-device module as `.single` for state dicts.
    The LR scheduler is deliberately not prepared: accelerate's wrapper steps it once per process,
    which would shorten the schedule by world size."""
    ds_config = deepspeed_config(train, accelerator.num_processes if not accelerate_uses_deepspeed()
                                 else int(os.environ.get("WORLD_SIZE", "1")))
    single = model
    plain = copy.deepcopy(model) if ds_config is not None else None  # before checkpointing / compile hooks
    wrapping = ""
    if grad_checkpointing:
        wrapping += f", gradient checkpointing ({apply_grad_checkpointing(model)})"
    if train.compile:
        wrapping += f", torch.compile ({train.compile_backend})"
    if ds_config is not None:
        from distrain.zero import create_zero_model

        # DeepSpeed compiles the module inside its engine (`engine.compile`, in place): its ZeRO hooks
        # and checkpoint keys then stay those of the plain module, where a torch.compile wrapper in
        # front of the engine breaks ZeRO-3's forward hooks and prefixes every key with `_orig_mod.`.
        trainable = create_zero_model(single, plain, optimizer, ds_config,
                                      accelerator if accelerate_uses_deepspeed() else None,
                                      compile_backend=train.compile_backend if train.compile else None)
    else:
        if train.compile:
            model = torch.compile(model, backend=train.compile_backend)
        model, optimizer = accelerator.prepare(model, optimizer)
        trainable = DDPModel(accelerator, model, optimizer, single, train)
    trainable.wrapping = wrapping
    return trainable


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
