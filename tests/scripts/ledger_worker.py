"""A scheduler worker whose jobs sleep instead of training, for the ledger stress test and
benchmarks/scheduler.py: `python tests/ledger_worker.py RUN_DIR N_JOBS [DURATIONS_JSON]`.

It runs the real `distrain.scheduler.run_worker` against the real ledger; only the job body is
synthetic (sleep for the job's duration while the heartbeat thread renews the lease). It appends
one line per claim to RUN_DIR/claims.log (for claim-overhead figures) and writes
RUN_DIR/aggregated/<worker> when aggregation completes.
"""

import json
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from distrain.config import SchedulerConfig  # noqa: E402
from distrain.distributed.ranks import Ranks  # noqa: E402
from distrain.orchestration.ledger import Ledger, default_worker_id  # noqa: E402
from distrain.orchestration.worker import WorkerSteps, run_worker  # noqa: E402


def main() -> int:
    run_dir, n_jobs = Path(sys.argv[1]), int(sys.argv[2])
    durations = json.loads(sys.argv[3]) if len(sys.argv) > 3 else [0.3] * n_jobs
    lease = float(os.environ.get("LEASE_S", "1.0"))
    poll = float(os.environ.get("POLL_S", lease / 5))
    ledger = Ledger(run_dir, lease_timeout_s=lease, max_retries=2, max_lost_leases=50)
    job_ids = [f"job{i:03d}" for i in range(n_jobs)]
    worker = default_worker_id()
    claim_log = run_dir / "claims.log"

    orig_claim_next = ledger.claim_next

    def timed_claim_next(ids, w):
        t0 = time.perf_counter()
        claim = orig_claim_next(ids, w)
        if claim is not None:
            with open(claim_log, "a") as f:
                f.write(json.dumps({"job": claim.job_id, "seconds": time.perf_counter() - t0}) + "\n")
        return claim

    ledger.claim_next = timed_claim_next

    def run_job(claim, beat):
        duration = durations[job_ids.index(claim.job_id)]
        end = time.monotonic() + duration
        while time.monotonic() < end:
            beat.progress = {"remaining_s": round(end - time.monotonic(), 2)}
            time.sleep(min(0.02, max(0.0, end - time.monotonic())))

    def aggregate(states, claim):
        time.sleep(0.2)
        (run_dir / "aggregated").mkdir(exist_ok=True)
        (run_dir / "aggregated" / worker.replace(":", "-")).write_text(
            json.dumps({"statuses": [s.status for s in states], "time": time.time()})
        )

    sc = SchedulerConfig(lease_timeout_s=lease, heartbeat_s=lease / 5, poll_s=poll)
    steps, quiet = WorkerSteps(run_job, aggregate), Ranks(log=lambda message: None)
    outcome = run_worker(ledger, job_ids, sc, quiet, steps, worker=worker, stop=threading.Event())
    return outcome.exit_code


if __name__ == "__main__":
    sys.exit(main())
