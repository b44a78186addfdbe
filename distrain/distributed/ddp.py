"""DDP through accelerate: the `Trainable` for everything but DeepSpeed ZeRO."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from accelerate import Accelerator

from distrain.config import TrainConfig
from distrain.distributed.base import Criterion, StepResult, Trainable


class DDPModel(Trainable):
    """A model and optimizer prepared by accelerate (DDP over several processes, AMP autocast, fp16
    GradScaler, no_sync during accumulation)."""

    def __init__(
        self, accelerator: Accelerator, model: torch.nn.Module, optimizer, single: torch.nn.Module, train: TrainConfig
    ):
        self.accelerator, self.model, self.optimizer, self.single = accelerator, model, optimizer, single
        self.plain = single  # evaluation uses the training weights directly
        self.max_norm = train.max_grad_norm if train.max_grad_norm > 0 else float("inf")
        # accelerate's autocast context costs time even when it casts nothing; skip it in fp32.
        self.autocast = accelerator.autocast if train.precision != "no" else contextlib.nullcontext

    def describe(self) -> str:
        n = self.accelerator.num_processes
        return (
            (f"DDP over {n} processes" if n > 1 else "one process")
            + f", precision {self.accelerator.mixed_precision}"
            + self.wrapping
        )

    def train(self) -> None:
        self.model.train()

    def micro_step(self, images: torch.Tensor, labels: torch.Tensor, criterion: Criterion):
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
        return {k: v.detach().to("cpu", copy=True) for k, v in self.single.state_dict().items()}

    def current_weights(self) -> torch.nn.Module:
        return self.single

    def eval_model(self) -> torch.nn.Module:
        return self.single

    def save(self, directory: Path, tag: str) -> dict:
        """Everything goes into the rank-0 checkpoint file (DDP replicas are identical)."""
        scaler = getattr(self.accelerator, "scaler", None)
        return {
            "model": {k: v.detach().cpu() for k, v in self.single.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
        }

    def load(self, directory: Path, saved: dict) -> None:
        self.single.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None and saved.get("scaler") is not None:
            scaler.load_state_dict(saved["scaler"])
