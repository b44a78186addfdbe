"""The shared vocabulary: the names that cross layers and are stored in files (ledger, report.json, meta.json,
MLflow), as string enums whose values are what the files hold. A `StrEnum` member equals its value, so files
written before these existed read back unchanged."""

from __future__ import annotations

from enum import StrEnum


class JobStatus(StrEnum):
    """Where a job (or the aggregation step) stands in the ledger."""

    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    """Failed for good: its retries (or lost leases) are spent; `distrain retry` revives it."""


class AttemptEnd(StrEnum):
    """How one attempt of a job ended (its `.end` file in the ledger)."""

    DONE = "done"
    FAILED = "failed"
    """An error; counts toward scheduler.max_retries."""
    PREEMPTED = "preempted"
    """SIGTERM: state saved, the job is pending again and the attempt does not count."""
    EXPIRED = "expired"
    """The owner stopped heartbeating (SIGKILL, node loss); counts toward scheduler.max_lost_leases."""
    DAMAGED = "damaged"
    """Not a worker's attempt: the job's files were found damaged or lost after it was done; trained again."""
    RETRIED = "retried"
    """Not a worker's attempt: `distrain retry` made a job failed for good pending again."""


class Ensemble(StrEnum):
    """The ensembles aggregation builds, in report.json's order."""

    BEST_SINGLE = "best_single"
    MEAN_SINGLE = "mean_single"
    FOLD_AVERAGE = "fold_average"
    SOFT_VOTE = "soft_vote"
    HARD_VOTE = "hard_vote"
    WEIGHTED_VOTE = "weighted_vote"
    SELECTION = "selection"
    K_OF_N_VOTE = "k_of_n_vote"
    STACKING = "stacking"


ENSEMBLE_ORDER = tuple(Ensemble)
REGISTRABLE = (Ensemble.BEST_SINGLE, Ensemble.SOFT_VOTE, Ensemble.WEIGHTED_VOTE, Ensemble.SELECTION, Ensemble.STACKING)
"""The ensembles the registered model can be: those that give probabilities from the columns' probabilities."""
VOTES = (Ensemble.SOFT_VOTE, Ensemble.HARD_VOTE, Ensemble.WEIGHTED_VOTE, Ensemble.K_OF_N_VOTE)
"""The ensembles of the `voting` stage's MLflow run."""
