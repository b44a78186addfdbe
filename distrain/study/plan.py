"""The plan of a study: models x seeds x folds, each cell a `Job`; a (model, seed) pair is a *column*.

Plain data, no torch: `distrain status`, the ledger and aggregation read a run directory through it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from distrain.config import Config

WHOLE_POOL = -1
"""The fold of a job outside the plan that trains on every CV sample and validates on none (a distilled student's
served network, `distrain distill`): its epoch count is chosen on the folds, its result is its last epoch."""


@dataclass(frozen=True)
class Job:
    """One cell of the plan models x seeds x folds (or a whole-pool job, fold `WHOLE_POOL`)."""

    model: str
    seed: int
    fold: int

    @property
    def id(self) -> str:
        return f"{self.column}-whole" if self.whole_pool else f"{self.column}-f{self.fold}"

    @property
    def whole_pool(self) -> bool:
        return self.fold == WHOLE_POOL

    @property
    def column(self) -> str:
        """The (model, seed) column this job's fold belongs to."""
        return column_key(self.model, self.seed)


def column_key(model: str, seed: int) -> str:
    """The name of a (model, seed) column: `<model>-s<seed>` (in report.json, MLflow and the OOF store)."""
    return f"{model}-s{seed}"


def parse_column(column: str) -> tuple[str, int]:
    """`column_key`'s inverse: (model, seed). Model names may contain `-s`; the seed is after the last."""
    model, seed = column.rsplit("-s", 1)
    return model, int(seed)


def plan_id(job_ids: list[str]) -> str:
    """A short name of a plan's job set (order-free): what a grown study's ledger and MLflow runs tell apart."""
    return hashlib.sha256("\n".join(sorted(job_ids)).encode()).hexdigest()[:12]


def expand_plan(cfg: Config) -> list[Job]:
    """models x seeds x folds, in that nesting order (so one backbone's jobs run together)."""
    folds = cfg.cv.only_folds or list(range(cfg.cv.folds))
    return [Job(m, s, f) for m in cfg.model.names for s in cfg.cv.seeds for f in folds]
