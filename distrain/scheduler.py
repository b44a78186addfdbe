"""The fold scheduler: workers claim jobs (model x seed x fold) from the run directory's ledger until
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

Exit codes (documented in the README): 0 all done, 1 a job or the aggregation failed,
75 stopped by SIGTERM with its state saved (the job resumes on the next claim), 2 bad input.
"""
from __future__ import annotations

import os
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, Optional, TypeVar

from distrain.ledger import AGGREGATE, TERMINAL, Claim, Heartbeat, JobState, Ledger

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again later"; Kubernetes podFailurePolicy ignores it

T = TypeVar("T")


class Preempted(Exception):
    """The job stopped at a step boundary on request (SIGTERM) after saving its training state."""


class LeaseLost(Exception):
    """Another worker took the job over (this worker missed heartbeats); stop without writing."""


@dataclass
class WorkerOutcome:
    trained: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    preempted: bool = False
    aggregated: bool = False
    exit_code: int = EXIT_OK


def parse_shard(text: Optional[str], env: Optional[dict] = None) -> Optional[tuple[int, int]]:
    """`i/n` from --shard, else ($JOB_COMPLETION_INDEX, $DISTRAIN_NUM_SHARDS), else None (dynamic mode).
    Raises ValueError with a one-line message for anything else."""
    env = os.environ if env is None else env
    if not text and env.get("JOB_COMPLETION_INDEX") not in (None, ""):
        if not env.get("DISTRAIN_NUM_SHARDS"):
            raise ValueError("JOB_COMPLETION_INDEX is set but DISTRAIN_NUM_SHARDS is not (set it to the "
                             "Indexed Job's completions)")
        text = f"{env['JOB_COMPLETION_INDEX']}/{env['DISTRAIN_NUM_SHARDS']}"
    if not text:
        return None
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard: expected i/n such as 0/4, got {text!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise ValueError(f"--shard: need 0 <= i < n, got {text!r}")
    return i, n


def select_shard(job_ids: list[str], shard: Optional[tuple[int, int]]) -> list[str]:
    """The jobs of static shard i/n: plan indices congruent to i mod n (all jobs when shard is None)."""
    if shard is None:
        return list(job_ids)
    i, n = shard
    return [j for k, j in enumerate(job_ids) if k % n == i]


def run_worker(ledger: Ledger, job_ids: list[str], *, worker: str,
               run_job: Callable[[Claim, Heartbeat], None],
               aggregate: Callable[[list[JobState]], None],
               heartbeat_s: float = 10.0, poll_s: float = 5.0, shard: Optional[tuple[int, int]] = None,
               wait_for_others: bool = True, is_primary: bool = True,
               coordinate: Callable[[Callable[[], T]], T] = lambda fn: fn(),
               stop_requested: Callable[[], bool] = lambda: False,
               log: Callable[[str], None] = print) -> WorkerOutcome:
    """Claim and run jobs until none is left for this worker; aggregate if this worker is the one.

    `coordinate(fn)` runs `fn` on rank 0 and returns its result on every rank (identity in one
    process); every ledger read or write goes through it, so all ranks agree on the job. `run_job`
    runs on every rank; it raises Preempted / LeaseLost to stop, anything else fails the attempt.
    """
    mine = select_shard(job_ids, shard)
    out = WorkerOutcome()

    def ledger_op(fn: Callable[[], T]) -> T:
        return coordinate(fn if is_primary else (lambda: None))  # type: ignore[return-value]

    def run_claimed(claim: Claim, body: Callable[[Heartbeat], None]) -> str:
        """Run `body` under a heartbeat; record how it ended; returns the end status."""
        beat = Heartbeat(ledger, claim, heartbeat_s) if is_primary else _NoHeartbeat()
        try:
            with beat:
                body(beat)
            status, error = "done", ""
        except Preempted:
            status, error = "preempted", ""
        except LeaseLost:
            status, error = "lost", ""
        except Exception as e:  # the attempt fails; the other jobs go on
            status, error = "failed", f"{type(e).__name__}: {e}"
            log(f"distrain: {claim.job_id} failed (attempt {claim.attempt}): {error}")
            if is_primary:
                log(traceback.format_exc())
        if status != "lost":
            ledger_op(lambda: ledger.finish(claim, status, error))
        return status

    while True:
        if stop_requested():
            out.preempted = True
            break
        claim = ledger_op(lambda: ledger.claim_next(mine, worker))
        if claim is not None:
            log(f"distrain: {worker} claimed {claim.job_id} (attempt {claim.attempt})")
            status = run_claimed(claim, lambda beat: run_job(claim, beat))
            if status == "done":
                out.trained.append(claim.job_id)
            elif status == "preempted":
                out.preempted = True
                break
            continue
        states = ledger_op(lambda: ledger.states(job_ids))
        if all(s.status in TERMINAL for s in states):
            agg_claim = ledger_op(lambda: ledger.try_claim(AGGREGATE, worker))
            if agg_claim is not None:
                log(f"distrain: {worker} aggregates (attempt {agg_claim.attempt})")
                status = run_claimed(agg_claim, lambda beat: aggregate(states))
                out.aggregated = status == "done"
                if status == "preempted":
                    out.preempted = True
                    break
                continue
            agg = ledger_op(lambda: ledger.state(AGGREGATE))
            if agg.status in TERMINAL or not wait_for_others:
                break
        elif shard is not None:
            # Static: leave once this shard's jobs are settled; the last worker to finish aggregates.
            if all(s.status in TERMINAL for s in states if s.job_id in set(mine)) or not wait_for_others:
                break
        elif not wait_for_others:
            break
        _sleep(poll_s, stop_requested)

    final = ledger_op(lambda: ledger.states(mine + [AGGREGATE]))
    out.failed = [s.job_id for s in final if s.status == "failed"]
    if out.failed and is_primary:  # say why the exit code is non-zero, also on a rerun that did nothing
        log("distrain: failed for good (retries used up): "
            + "; ".join(f"{s.job_id} after {len(s.attempts)} attempt(s): {' '.join(s.last_error.split())}"
                        for s in final if s.status == "failed")
            + (f"; fix the cause, then `distrain aggregate --run-dir {ledger.root.parent}`"
               if AGGREGATE in out.failed else ""))
    if out.preempted:
        out.exit_code = EXIT_PREEMPTED
    elif out.failed:
        out.exit_code = EXIT_FAILED
    return out


class _NoHeartbeat:
    """What non-primary ranks hold instead of a Heartbeat: rank 0 alone renews the lease."""

    def __init__(self):
        import threading

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
