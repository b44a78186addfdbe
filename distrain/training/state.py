"""A job's training progress as one typed object that saves and loads itself.

Everything a resumed job needs besides the weights, optimizer, LR schedule and RNG (which the
checkpoint holds beside it): where in the data stream it stands, the current epoch's running sums,
the per-epoch history and the best epoch so far with its weights and OOF predictions. `state_dict()`
holds only plain types and tensors, so checkpoints load with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import torch

from distrain.study.results import Predictions


@dataclass
class EpochSums:
    """Running sums of the epoch in progress (read from the device only when a checkpoint is saved)."""

    loss_sum: float = 0.0
    correct: float = 0.0
    grad_norm_sum: float = 0.0
    seen: int = 0
    grad_norm_count: int = 0
    seconds: float = 0.0


@dataclass
class BestEpoch:
    """The best validation score so far, with the weights and OOF predictions that gave it."""

    score: float = math.nan  # nothing scored yet (the metric may point either way)
    epoch: int = -1
    state: Optional[dict[str, torch.Tensor]] = None
    oof: Optional[Predictions] = None
    source: str = "raw"
    """`raw` (the trained weights) or `ema` (their moving average, train.ema_decay)."""

    def state_dict(self) -> dict[str, Any]:
        oof = None
        if self.oof is not None:
            oof = {
                "sample_ids": list(self.oof.sample_ids),
                "probs": torch.from_numpy(self.oof.probs),
                "labels": torch.from_numpy(self.oof.labels),
            }
        return {"score": self.score, "epoch": self.epoch, "state": self.state, "oof": oof, "source": self.source}

    @classmethod
    def from_state_dict(cls, d: dict[str, Any]) -> BestEpoch:
        oof = d["oof"]
        if oof is not None:
            oof = Predictions(oof["sample_ids"], oof["probs"].numpy(), oof["labels"].numpy())
        return cls(score=d["score"], epoch=d["epoch"], state=d["state"], oof=oof, source=d.get("source", "raw"))


@dataclass
class TrainState:
    """Where a job stands: the next (epoch, step) to run, micro-batches drawn from the stream so far,
    counters, history and the best epoch."""

    epoch: int = 0
    step: int = 0
    batches: int = 0
    """Micro-batches drawn from the training stream: a resumed job replays this many to reach its position."""
    skipped_steps: int = 0
    """Optimizer steps the fp16 loss scaler skipped."""
    nonfinite_losses: int = 0
    sums: EpochSums = field(default_factory=EpochSums)
    history: list[dict] = field(default_factory=list)
    best: BestEpoch = field(default_factory=BestEpoch)

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "step": self.step,
            "batches": self.batches,
            "skipped_steps": self.skipped_steps,
            "nonfinite_losses": self.nonfinite_losses,
            "sums": asdict(self.sums),
            "history": self.history,
            "best": self.best.state_dict(),
        }

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.epoch, self.step, self.batches = d["epoch"], d["step"], d["batches"]
        self.skipped_steps = d["skipped_steps"]
        self.nonfinite_losses = d.get("nonfinite_losses", 0)
        self.sums = EpochSums(**d["sums"])
        self.history = d["history"]
        self.best = BestEpoch.from_state_dict(d["best"])
