"""The job ledger: who trains which job, kept as small files in `<run_dir>/ledger/`.

The run directory may be local disk, NFS or a Kubernetes volume shared by many pods, so the ledger
uses only operations that are atomic on all of them, and no locks:

    ledger/jobs/<job_id>/attempt-000003.json   the claim {worker, host, pid, claimed_at}
    ledger/jobs/<job_id>/attempt-000003.hb     the latest heartbeat {time, progress} (replaced atomically)
    ledger/jobs/<job_id>/attempt-000003.end    how the attempt ended {status, time, error, last_heartbeat}

Claim and end files are created by hard-linking a complete temporary file to the final name:
`link` fails if the name exists, so of two workers claiming attempt N of a job exactly one wins
and readers never see half a file. Attempt numbers only grow, so the directory *is* the job's
history. A worker owns a job while its attempt is the newest one, has no end file and heartbeats
within `lease_timeout_s`; after that the next claim (attempt N+1) first marks attempt N `expired`.

Attempt end states: `done`, `failed` (an error; counts toward `max_retries`), `preempted` (SIGTERM;
the job is pending again and does not count), `expired` (the owner stopped heartbeating: SIGKILL,
node loss; counts toward `max_lost_leases`), `damaged` / `retried` (not a worker's attempt: `requeue` made the job
pending again because its files were found damaged or lost after it was done, or because `distrain retry` was
asked to try a job failed for good once more; the attempts before it no longer count).

Times are wall-clock seconds (time.time()); nodes sharing a ledger need clocks in sync to well
under `lease_timeout_s` (NTP does that).
"""

from __future__ import annotations

import os
import re
import socket
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from distrain.errors import LeaseLost
from distrain.fsutil import atomic_write_json, create_exclusive_json
from distrain.fsutil import read_json_if_complete as _read_json
from distrain.names import AttemptEnd, JobStatus
from distrain.study.plan import plan_id

TERMINAL = (JobStatus.DONE, JobStatus.FAILED)
REQUEUED = (
    AttemptEnd.DAMAGED,
    AttemptEnd.RETRIED,
)  # not a worker's attempt: the job was made pending again, and starts afresh
_ATTEMPT = re.compile(r"^attempt-(\d{6})\.(json|hb|end)$")


def aggregate_id(job_ids: list[str]) -> str:
    """The ledger entry of the aggregation step of a plan (claimed like a job, done once): `_aggregate-<hash of
    the plan's job ids>`, so a study grown by new jobs is aggregated once more, and once."""
    return f"_aggregate-{plan_id(job_ids)}"


@dataclass(frozen=True)
class Claim:
    """A won claim: `job_id`'s attempt number `attempt`, owned by `worker`."""

    job_id: str
    attempt: int
    worker: str


@dataclass
class Attempt:
    number: int
    worker: str
    claimed_at: float
    heartbeat: Optional[dict] = None  # {"time": ..., "progress": {...}}
    end: Optional[dict] = None  # {"status": ..., "time": ..., "error": ...}

    @property
    def last_seen(self) -> float:
        """The owner's last sign of life: its end, else its latest heartbeat, else its claim."""
        if self.end is not None:
            return float(self.end.get("last_heartbeat") or self.end["time"])
        return float(self.heartbeat["time"]) if self.heartbeat else self.claimed_at


@dataclass
class JobState:
    job_id: str
    status: JobStatus
    attempts: list[Attempt] = field(default_factory=list)
    errors: int = 0  # attempts that ended `failed`
    lost: int = 0  # attempts whose owner vanished (`expired`, or overdue and not yet marked)
    owner: str = ""
    heartbeat_age_s: Optional[float] = None
    progress: dict = field(default_factory=dict)
    last_error: str = ""

    def to_dict(self) -> dict:
        d = asdict(self)
        d["attempts"] = len(self.attempts)
        return d


def default_worker_id() -> str:
    """`$DISTRAIN_WORKER_ID` (set by `distrain schedule`, or a pod name) plus host and pid, so that a
    restarted worker is a new owner."""
    base = os.environ.get("DISTRAIN_WORKER_ID") or socket.gethostname()
    return f"{base}:{os.getpid()}"


class Ledger:
    """Claims, leases, heartbeats and history of the jobs of one run directory."""

    def __init__(
        self, run_dir: str | Path, *, lease_timeout_s: float = 120.0, max_retries: int = 2, max_lost_leases: int = 10
    ):
        self.root = Path(run_dir) / "ledger"
        self.lease_timeout_s = lease_timeout_s
        self.max_retries = max_retries
        self.max_lost_leases = max_lost_leases

    # ---- reading -------------------------------------------------------------------------------
    def _dir(self, job_id: str) -> Path:
        return self.root / "jobs" / job_id

    def attempts(self, job_id: str) -> list[Attempt]:
        """Every attempt of a job, oldest first."""
        d = self._dir(job_id)
        try:
            names = os.listdir(d)
        except FileNotFoundError:
            return []
        files: dict[int, dict[str, str]] = {}
        for name in names:
            m = _ATTEMPT.match(name)
            if m:
                files.setdefault(int(m.group(1)), {})[m.group(2)] = name
        out = []
        for n in sorted(files):
            kinds = files[n]
            if "json" not in kinds:
                continue  # cannot happen (the claim is created first); ignore debris
            claim = _read_json(d / kinds["json"])
            if claim is None:
                continue
            out.append(
                Attempt(
                    number=n,
                    worker=claim["worker"],
                    claimed_at=float(claim["claimed_at"]),
                    heartbeat=_read_json(d / kinds["hb"]) if "hb" in kinds else None,
                    end=_read_json(d / kinds["end"]) if "end" in kinds else None,
                )
            )
        return out

    def state(self, job_id: str, now: Optional[float] = None) -> JobState:
        """The job's status derived from its attempts."""
        now = time.time() if now is None else now
        attempts = self.attempts(job_id)
        st = JobState(job_id=job_id, status=JobStatus.PENDING, attempts=attempts)
        requeued = [i for i, a in enumerate(attempts) if (a.end or {}).get("status") in REQUEUED]
        current = attempts[requeued[-1] + 1 :] if requeued else attempts  # a re-queued job starts afresh
        for a in current:
            status = (a.end or {}).get("status")
            if status == JobStatus.FAILED:
                st.errors += 1
                st.last_error = a.end.get("error", "")
            elif status == AttemptEnd.EXPIRED:
                st.lost += 1
        last = attempts[-1] if attempts else None
        if any((a.end or {}).get("status") == AttemptEnd.DONE for a in current):
            st.status = JobStatus.DONE
        elif last is not None and last.end is None:
            age = now - last.last_seen
            if age <= self.lease_timeout_s:
                st.status, st.owner, st.heartbeat_age_s = JobStatus.RUNNING, last.worker, age
                st.progress = (last.heartbeat or {}).get("progress", {})
            else:
                st.lost += 1  # overdue: counts as lost even before someone marks it expired
        if st.status == JobStatus.PENDING and (st.errors >= self.max_retries or st.lost >= self.max_lost_leases):
            st.status = JobStatus.FAILED
            if not st.last_error:
                st.last_error = (
                    f"owner lost {st.lost} times (killed or node lost; max_lost_leases={self.max_lost_leases})"
                )
        return st

    def states(self, job_ids: list[str]) -> list[JobState]:
        now = time.time()
        return [self.state(j, now) for j in job_ids]

    # ---- writing -------------------------------------------------------------------------------
    def try_claim(self, job_id: str, worker: str) -> Optional[Claim]:
        """Claim `job_id` if it is pending (never claimed, preempted, or its owner's lease expired).
        Returns the claim, or None when the job is not claimable or another worker won the race."""
        st = self.state(job_id)
        if st.status != JobStatus.PENDING:
            return None
        last = st.attempts[-1] if st.attempts else None
        if last is not None and last.end is None:  # overdue owner: record it before taking over
            expired = create_exclusive_json(
                self._dir(job_id) / f"attempt-{last.number:06d}.end",
                {
                    "status": AttemptEnd.EXPIRED,
                    "time": time.time(),
                    "last_heartbeat": last.last_seen,
                    "error": f"no heartbeat for > {self.lease_timeout_s:g} s",
                },
            )
            if not expired:
                return None  # the owner ended it meanwhile (done, say) or another worker expired it: look again
        number = (last.number if last else 0) + 1
        claim = {"worker": worker, "host": socket.gethostname(), "pid": os.getpid(), "claimed_at": time.time()}
        if not create_exclusive_json(self._dir(job_id) / f"attempt-{number:06d}.json", claim):
            return None
        return Claim(job_id=job_id, attempt=number, worker=worker)

    def requeue(self, job_id: str, reason: str, mark: AttemptEnd = AttemptEnd.DAMAGED) -> bool:
        """Make a job pending again, recorded as an attempt that ended `mark` with the reason: `damaged` for a done
        job whose files were found damaged or lost, `retried` for a job failed for good whose cause was fixed
        (`distrain retry`; also an aggregation that must run again). The attempts before it no longer count. False
        if the job is not done (damaged) or settled (retried), e.g. another worker re-queued or claimed it first."""
        assert mark in REQUEUED, mark
        st = self.state(job_id)
        if st.status not in ((JobStatus.DONE,) if mark == AttemptEnd.DAMAGED else TERMINAL):
            return False  # re-queued by another worker meanwhile (and perhaps claimed already)
        number = (st.attempts[-1].number if st.attempts else 0) + 1
        claim = {"worker": "requeue", "host": socket.gethostname(), "pid": os.getpid(), "claimed_at": time.time()}
        if not create_exclusive_json(self._dir(job_id) / f"attempt-{number:06d}.json", claim):
            return False
        end = {"status": mark, "time": time.time(), "error": reason[:2000], "last_heartbeat": None}
        return create_exclusive_json(self._dir(job_id) / f"attempt-{number:06d}.end", end)

    def claim_next(self, job_ids: list[str], worker: str) -> Optional[Claim]:
        """The first claimable job of `job_ids` (in order), claimed; None if there is none."""
        for job_id in job_ids:
            claim = self.try_claim(job_id, worker)
            if claim is not None:
                return claim
        return None

    def fence(self, claim: Claim) -> None:
        """Raise LeaseLost unless `claim` still owns its job: called before a write that a stale owner (one
        frozen past its lease, then woken) must not make."""
        if not self.owns(claim):
            raise LeaseLost(f"{claim.job_id}: attempt {claim.attempt} of {claim.worker} no longer owns it")

    def owns(self, claim: Claim) -> bool:
        """True while `claim` is the job's newest attempt and has not ended."""
        d = self._dir(claim.job_id)
        if (d / f"attempt-{claim.attempt:06d}.end").exists():
            return False
        return not (d / f"attempt-{claim.attempt + 1:06d}.json").exists()

    def heartbeat(self, claim: Claim, progress: Optional[dict] = None) -> bool:
        """Renew the lease; False (and nothing written) if the claim was lost to another worker."""
        if not self.owns(claim):
            return False
        atomic_write_json(
            self._dir(claim.job_id) / f"attempt-{claim.attempt:06d}.hb",
            {"time": time.time(), "progress": progress or {}},
        )
        return True

    def finish(self, claim: Claim, status: str, error: str = "") -> bool:
        """End the attempt as done / failed / preempted. False if it had already ended (lost lease)."""
        assert status in (AttemptEnd.DONE, AttemptEnd.FAILED, AttemptEnd.PREEMPTED), status
        hb = _read_json(self._dir(claim.job_id) / f"attempt-{claim.attempt:06d}.hb")
        return create_exclusive_json(
            self._dir(claim.job_id) / f"attempt-{claim.attempt:06d}.end",
            {"status": status, "time": time.time(), "error": error[:2000], "last_heartbeat": (hb or {}).get("time")},
        )


class Heartbeat:
    """Renews a claim's lease every `interval_s` from a background thread, so long steps or evaluation
    never let it lapse. `lost` turns true when another worker took the job over."""

    def __init__(self, ledger: Ledger, claim: Claim, interval_s: float):
        self.ledger, self.claim, self.interval_s = ledger, claim, interval_s
        self.progress: dict = {}
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{claim.job_id}", daemon=True)

    def __enter__(self) -> Heartbeat:
        self.ledger.heartbeat(self.claim, self.progress)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                if not self.ledger.heartbeat(self.claim, dict(self.progress)):
                    self.lost.set()
                    return
            except OSError:
                pass  # a transient shared-volume error: the next beat retries; the lease has slack
