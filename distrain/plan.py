"""The plan of a study, and what one job of it produces: plain data, no torch.

A study is models x seeds x folds; each cell is a `Job`. Kept apart from the training engine so that
`distrain status`, aggregation and the ledger can read a run directory without importing torch or timm.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from distrain.config import Config


@dataclass(frozen=True)
class Job:
    """One cell of the plan models x seeds x folds."""

    model: str
    seed: int
    fold: int

    @property
    def id(self) -> str:
        return f"{self.model}-s{self.seed}-f{self.fold}"


@dataclass
class Predictions:
    """Probabilities keyed by sample id, in a fixed (sorted by id) order."""

    sample_ids: list[str]
    probs: np.ndarray  # [n, num_classes] float32
    labels: np.ndarray  # [n] int64

    def score(self, metric: str) -> float:
        from distrain.metrics import score  # late: scikit-learn takes seconds to import

        return score(metric, self.labels, self.probs)


@dataclass
class JobResult:
    job: Job
    val_score: float
    best_epoch: int
    oof: Predictions
    test: Optional[Predictions]
    best_state: dict  # fp32 state dict of the single-device model at its best epoch
    history: list[dict] = field(default_factory=list)


def expand_plan(cfg: Config) -> list[Job]:
    """models x seeds x folds, in that nesting order (so one backbone's jobs run together)."""
    folds = cfg.cv.only_folds or list(range(cfg.cv.folds))
    return [Job(m, s, f) for m in cfg.model.names for s in cfg.cv.seeds for f in folds]
