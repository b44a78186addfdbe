"""The worker loop: workers claim jobs (model x seed x fold) from the run directory's ledger until
none remain, then exactly one of them aggregates.

A *worker* is one process group (one `accelerate launch`, one pod): rank 0 talks to the ledger and
every rank trains the job it claimed. Modes:

- dynamic (default): claim the next pending job, in plan order, until no job is pending; then wait
  while other workers' jobs run, to take over any whose owner dies (lease expiry);
- static: `--shard i/n` or `$JOB_COMPLETION_INDEX` (Kubernetes Indexed Job, with `$DISTRAIN_NUM_SHARDS`)
  trains only the jobs whose plan index is i mod n, still through the ledger, so a restarted pod
  resumes its own jobs and two pods of one index never train the same job.

When every job is done or failed, the worker that claims the ledger's `_aggregate` entry writes the
report; a crash there expires its lease like any job's, and another worker (or the restarted one)
aggregates instead: never zero times, never twice.

Exit codes (`distrain.errors`, documented in the README): 0 all done, 1 a job or the aggregation
failed, 75 stopped by SIGTERM with its state saved (the job resumes on the next claim), 2 bad input.
"""

from __future__ import annotations

import os
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NoReturn, Optional, TypeVar

from distrain.config import SchedulerConfig
from distrain.distributed.ranks import Ranks
from distrain.errors import (
    EXIT_FAILED_FOR_GOOD,
    EXIT_OK,
    EXIT_PREEMPTED,
    BadInput,
    LeaseLost,
    Preempted,
    storage_error,
)
from distrain.names import AttemptEnd, JobStatus
from distrain.orchestration.ledger import TERMINAL, Claim, Heartbeat, JobState, Ledger, aggregate_id

T = TypeVar("T")


@dataclass
class WorkerOutcome:
    trained: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    preempted: bool = False
    aggregated: bool = False
    exit_code: int = EXIT_OK


def parse_shard(text: Optional[str], env: Optional[dict] = None) -> Optional[tuple[int, int]]:
    """`i/n` from --shard, else ($JOB_COMPLETION_INDEX, $DISTRAIN_NUM_SHARDS), else None (dynamic mode).
    Raises BadInput with a one-line message for anything else."""
    env = os.environ if env is None else env
    if not text and env.get("JOB_COMPLETION_INDEX") not in (None, ""):
        if not env.get("DISTRAIN_NUM_SHARDS"):
            raise BadInput(
                "JOB_COMPLETION_INDEX is set but DISTRAIN_NUM_SHARDS is not (set it to the Indexed Job's completions)"
            )
        text = f"{env['JOB_COMPLETION_INDEX']}/{env['DISTRAIN_NUM_SHARDS']}"
    if not text:
        return None
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise BadInput(f"--shard: expected i/n such as 0/4, got {text!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise BadInput(f"--shard: need 0 <= i < n, got {text!r}")
    return i, n


def select_shard(job_ids: list[str], shard: Optional[tuple[int, int]]) -> list[str]:
    """The jobs of static shard i/n: plan indices congruent to i mod n (all jobs when shard is None)."""
    if shard is None:
        return list(job_ids)
    i, n = shard
    return [j for k, j in enumerate(job_ids) if k % n == i]


@dataclass(frozen=True)
class WorkerSteps:
    """What a worker does with what it claims: `run_job(claim, heartbeat)` trains a job on every rank (it raises
    Preempted / LeaseLost to stop, anything else fails the attempt); `aggregate(states, claim)` runs the plan's
    aggregation step."""

    run_job: Callable[[Claim, Heartbeat], None]
    aggregate: Callable[[list[JobState], Claim], None]


def run_worker(
    ledger: Ledger,
    job_ids: list[str],
    sc: SchedulerConfig,
    ranks: Ranks,
    steps: WorkerSteps,
    *,
    worker: str,
    stop: threading.Event,
    shard: Optional[tuple[int, int]] = None,
) -> WorkerOutcome:
    """Claim and run jobs until none is left for this worker; aggregate if this worker is the one.

    Every ledger read or write runs on rank 0 (`ranks.primary`) and its result is shared, so all ranks agree on
    the job; `sc` gives the heartbeat and poll intervals and whether to wait for other workers' jobs; `stop` is
    set on SIGTERM.
    """
    log, run_job, aggregate, stop_requested = ranks.log, steps.run_job, steps.aggregate, stop.is_set
    loop = _ClaimLoop(ledger, worker, sc.heartbeat_s, ranks, aggregate_id(job_ids))
    mine = select_shard(job_ids, shard)
    out = WorkerOutcome()
    while True:
        if stop_requested():  # SIGTERM between jobs: 75, unless nothing was left to do (then 0)
            out.preempted = not loop.all_settled(job_ids)
            break
        claim = loop.ledger_op(lambda: ledger.claim_next(mine, worker))
        if claim is not None:
            log(f"distrain: {worker} claimed {claim.job_id} (attempt {claim.attempt})")
            status = loop.run_claimed(claim, lambda beat, claim=claim: run_job(claim, beat))
            out.trained += [claim.job_id] if status == AttemptEnd.DONE else []
            if status == AttemptEnd.PREEMPTED:
                break
            continue
        states = loop.ledger_op(lambda: ledger.states(job_ids))
        if all(s.status in TERMINAL for s in states):
            status = loop.try_aggregate(lambda claim, states=states: aggregate(states, claim))
            out.aggregated = out.aggregated or status == AttemptEnd.DONE
            if status == AttemptEnd.PREEMPTED:
                break
            if status is not None:
                continue  # look at the ledger again: the aggregation may need another try
            if loop.ledger_op(lambda: ledger.state(loop.aggregate_id)).status in TERMINAL or not sc.wait_for_others:
                break
        elif shard is not None:
            # Static: leave once this shard's jobs are settled; the last worker to finish aggregates.
            if all(s.status in TERMINAL for s in states if s.job_id in set(mine)) or not sc.wait_for_others:
                break
        elif not sc.wait_for_others:
            break
        _sleep(sc.poll_s, stop_requested)
    out.preempted = out.preempted or loop.preempted
    out.failed = loop.report_failed(mine)
    out.exit_code = EXIT_PREEMPTED if out.preempted else EXIT_FAILED_FOR_GOOD if out.failed else EXIT_OK
    return out


class _ClaimLoop:
    """The ledger side of one worker: ledger calls agreed by all ranks, claimed work run under a heartbeat."""

    def __init__(self, ledger: Ledger, worker: str, heartbeat_s: float, ranks: Ranks, aggregate_id: str):
        self.ledger, self.worker, self.heartbeat_s, self.ranks = ledger, worker, heartbeat_s, ranks
        self.is_primary, self.log = ranks.is_primary, ranks.log
        self.aggregate_id = aggregate_id  # the plan's aggregation entry in the ledger
        self.preempted = False

    def ledger_op(self, fn: Callable[[], T]) -> T:
        return self.ranks.primary(fn)

    def run_claimed(self, claim: Claim, body: Callable[[Heartbeat], None]) -> str:
        """Run `body` under a heartbeat; record how it ended; returns the end status."""
        beat = Heartbeat(self.ledger, claim, self.heartbeat_s) if self.is_primary else _NoHeartbeat()
        try:
            with beat:
                body(beat)
            status, error = AttemptEnd.DONE, ""
        except Preempted:
            status, error = AttemptEnd.PREEMPTED, ""
        except LeaseLost:
            status, error = "lost", ""
            self.log(f"distrain: {claim.job_id}: taken over by another worker (lease lost); attempt "
                     f"{claim.attempt} stops without writing")  # fmt: skip
        except BadInput as e:  # bad data or config fails every attempt alike: stop with its one line (exit 2)
            self._stop_for_good(claim, e)
        except Exception as e:  # the attempt fails; the other jobs go on
            if storage_error(e) is not None:  # disk full / read-only: the next job would fail alike
                self._stop_for_good(claim, storage_error(e))
            status, error = AttemptEnd.FAILED, f"{type(e).__name__}: {e}"
            self.log(f"distrain: {claim.job_id} failed (attempt {claim.attempt}): {error}")
            if self.is_primary:
                self.log(traceback.format_exc())
        if status != "lost" and not self.ledger_op(lambda: self.ledger.finish(claim, status, error)):
            status = "lost"  # it had ended meanwhile: another worker took it over, its record stands
        self.preempted = self.preempted or status == AttemptEnd.PREEMPTED
        return status

    def _stop_for_good(self, claim: Claim, error: BadInput) -> NoReturn:
        """End the attempt as failed and stop the worker with `error`'s one line: no retry would go otherwise."""
        if self.is_primary:  # the ledger directly: the other ranks may be inside a collective
            self.ledger.finish(claim, AttemptEnd.FAILED, f"{type(error).__name__}: {error}")
            if self.ledger.state(claim.job_id).status == JobStatus.FAILED:  # no retries left: say how to revive it
                raise type(error)(f"{error}; {claim.job_id} failed for good: once the cause is fixed, `distrain "
                                  f"retry --run-dir {self.ledger.root.parent}` and run again") from None  # fmt: skip
        raise error from None

    def all_settled(self, job_ids: list[str]) -> bool:
        """True when every job and the aggregation have ended for good (done or failed): nothing left to do."""
        states = self.ledger_op(lambda: self.ledger.states(job_ids + [self.aggregate_id]))
        return all(s.status in TERMINAL for s in states)

    def try_aggregate(self, aggregate: Callable[[Claim], None]) -> Optional[str]:
        """Claim and run the aggregation if it is this worker's to do; its end status, or None if not."""
        claim = self.ledger_op(lambda: self.ledger.try_claim(self.aggregate_id, self.worker))
        if claim is None:
            return None
        self.log(f"distrain: {self.worker} aggregates (attempt {claim.attempt})")
        return self.run_claimed(claim, lambda beat: aggregate(claim))

    def report_failed(self, mine: list[str]) -> list[str]:
        """The jobs (and aggregation) failed for good; says why, so a non-zero exit is explained even on a
        rerun that did nothing."""
        final = self.ledger_op(lambda: self.ledger.states(mine + [self.aggregate_id]))
        failed = [s for s in final if s.status == JobStatus.FAILED]
        if failed and self.is_primary:
            self.log(
                "distrain: failed for good (retries used up): "
                + "; ".join(
                    f"{s.job_id} after {len(s.attempts)} attempt(s): {' '.join(s.last_error.split())}" for s in failed
                )
                + f"; fix the cause, then `distrain retry --run-dir {self.ledger.root.parent}` and run this command "
                f"again (or `distrain aggregate --run-dir {self.ledger.root.parent}` for the report without them)"
            )
        return [s.job_id for s in failed]


class _NoHeartbeat:
    """What non-primary ranks hold instead of a Heartbeat: rank 0 alone renews the lease."""

    def __init__(self):
        self.progress: dict = {}
        self.lost = threading.Event()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def _sleep(seconds: float, stop_requested: Callable[[], bool]) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end and not stop_requested():
        time.sleep(min(0.2, max(0.0, end - time.monotonic())))
