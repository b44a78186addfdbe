"""The interface the training loop drives, whatever wraps the model: `Trainable` (DDP or DeepSpeed ZeRO)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch


@dataclass
class StepResult:
    """What one micro-batch did to the optimizer."""

    boundary: bool
    """The accumulation window ended: an optimizer step was due."""
    applied: bool
    """...and was applied (False when fp16 loss scaling found inf/NaN gradients and skipped it)."""
    grad_norm: Optional[torch.Tensor]
    """Global gradient norm before clipping, at a boundary."""


Criterion = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Trainable(ABC):
    """A single-device model and its optimizer made trainable on this process group.

    `single` is the unwrapped module (state-dict keys as timm names them); `plain` is a module with the
    same keys that evaluation and prediction run on (the training module itself under DDP, an fp32 copy
    under ZeRO). `wrapping` says what `distributed.wrap` applied before the wrapper."""

    single: torch.nn.Module
    plain: torch.nn.Module
    wrapping: str = ""

    @abstractmethod
    def describe(self) -> str:
        """One line for the job's log: the wrapper, the world size, the precision, `wrapping`."""

    @abstractmethod
    def train(self) -> None:
        """Put the training module in training mode."""

    @abstractmethod
    def micro_step(self, images: torch.Tensor, labels: torch.Tensor, criterion: Criterion):
        """Forward and backward of one micro-batch, and at the end of the accumulation window the
        (clipped) optimizer step. Returns (loss, logits, StepResult)."""

    @abstractmethod
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Every weight and buffer of the single-device model, fp32 on CPU. Collective under ZeRO."""

    @abstractmethod
    def current_weights(self) -> torch.nn.Module:
        """A module (timm's keys) holding this rank's full current weights, without a collective: what an EMA
        of the weights reads after each optimizer step."""

    @abstractmethod
    def eval_model(self) -> torch.nn.Module:
        """`plain` holding the current weights, ready to evaluate. Collective under ZeRO."""

    @abstractmethod
    def save(self, directory: Path, tag: str) -> dict:
        """Save what the rank-0 checkpoint file cannot hold under `directory/tag` (collective), and
        return what that file records (weights, optimizer and scaler state, or a reference)."""

    @abstractmethod
    def load(self, directory: Path, saved: dict) -> None:
        """Restore what `save` wrote; raises FileNotFoundError when part of it is missing."""
