"""Every exception distrain raises on purpose, and the exit codes they map to, in one place.

    DistrainError                 anything distrain reports in one line (exit 1 unless a subclass says)
    ├── BadInput                  refused before any work; exit 2
    │   ├── ConfigError           a config key or value, a launcher file that disagrees with it
    │   ├── DataError             shards, index, images, a run directory that holds something else
    │   │   └── FoldManifestMismatch   a run directory split with other folds
    │   ├── EnsembleError         predictions that cannot be ensembled
    │   ├── StorageError          a path distrain must write is full, read-only or not permitted
    │   └── NoGPU                 fewer GPUs visible than asked for; exit 4
    ├── JobFailure                one job attempt failed (counts toward scheduler.max_retries)
    │   └── NonFiniteLoss         the loss stayed NaN/inf (train.max_nonfinite_losses)
    └── Interrupted               a job stopped at a step boundary, its state saved
        ├── Preempted             SIGTERM: exit 75, the job resumes on the next claim
        └── LeaseLost             another worker took the job over: stop without writing

This module imports nothing heavy, so a refusal costs no torch import. `BadInput` also derives from
ValueError, which callers of the library functions (and older code) catch.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1  # an unexpected error (a crash, a traceback): a new attempt may succeed
EXIT_BAD_INPUT = 2  # refused before any work: config, data, command line
EXIT_FAILED_FOR_GOOD = 3  # a job or the aggregation failed for good (scheduler.max_retries used up)
EXIT_NO_GPU = 4  # asked for GPUs (--gpus-per-worker) and saw fewer: the node or the image's CUDA is wrong
EXIT_PREEMPTED = 75  # EX_TEMPFAIL, "try again later": stopped by SIGTERM with the state saved


class DistrainError(Exception):
    """An error distrain reports as one line; `exit_code` is what the process exits with."""

    exit_code = EXIT_FAILED


class BadInput(DistrainError, ValueError):
    """Input that cannot be used as given; the message is one line naming the problem."""

    exit_code = EXIT_BAD_INPUT


class ConfigError(BadInput):
    """A config that cannot be run; the message names the key and the value."""


class DataError(BadInput):
    """Data (shards, index, images) or a run directory that cannot be used as given."""


class FoldManifestMismatch(DataError):
    """The run directory holds a fold manifest other than the one this config and data imply."""


class EnsembleError(BadInput):
    """Predictions that cannot be ensembled; the message names the job or column."""


class StorageError(BadInput):
    """A path distrain must write to is full, read-only or not permitted; the message names the path."""


STORAGE_ERRNOS = frozenset({28, 122, 30, 13, 1})  # ENOSPC, EDQUOT, EROFS, EACCES, EPERM (Linux numbering)


def storage_cause(error: BaseException | None) -> OSError | None:
    """The OSError behind `error` (itself, or in its chain: torch.save raises a RuntimeError from it) that another
    attempt would meet alike: disk full, read-only, no permission. None for any other error."""
    while error is not None and not (isinstance(error, OSError) and error.errno in STORAGE_ERRNOS):
        error = error.__cause__ or error.__context__
    return error


def storage_error(error: BaseException) -> StorageError | None:
    """The one-line StorageError for an error `storage_cause` finds, naming the path; None for any other error."""
    import os

    cause = storage_cause(error)
    if cause is None:
        return None
    return StorageError(f"cannot write {cause.filename or 'a file'}: {cause.strerror or os.strerror(cause.errno)}; "
                        f"free space, fix the permissions or choose another run_root / --out, then run the command "
                        f"again")  # fmt: skip


class NoGPU(BadInput):
    """Fewer CUDA GPUs visible than the worker was asked for; training on CPU instead would hold the GPUs idle."""

    exit_code = EXIT_NO_GPU


class JobFailure(DistrainError):
    """One job attempt failed for a reason of its own (the other jobs go on)."""


class NonFiniteLoss(JobFailure):
    """Too many consecutive NaN/inf losses (train.max_nonfinite_losses): the run diverged."""


class Interrupted(DistrainError):
    """A job stopped at an optimizer-step boundary on request, after saving its training state."""


class Preempted(Interrupted):
    """The worker was asked to stop (SIGTERM); the job is pending again and resumes from its state."""

    exit_code = EXIT_PREEMPTED


class LeaseLost(Interrupted):
    """Another worker took the job over (this one missed heartbeats); stop without writing."""


def refuse(error: BadInput) -> int:
    """Say why input was refused, as the one line a user sees last, and return the exit code."""
    return exit_with_line(f"distrain: error: {error}", error.exit_code)


def exit_with_line(message: str, exit_code: int) -> int:
    """Print `message` as the last line on stderr and return `exit_code`. Under `distrain schedule` the worker's
    result file carries the code too (accelerate launch turns every child failure into exit 1)."""
    import json
    import os
    import sys
    from pathlib import Path

    print(message, file=sys.stderr, flush=True)
    if os.environ.get("DISTRAIN_WORKER_RESULT") and os.environ.get("LOCAL_RANK", "0") == "0":  # one per node
        result = {"exit_code": exit_code, "message": message}
        Path(os.environ["DISTRAIN_WORKER_RESULT"]).write_text(json.dumps(result))
    return exit_code
