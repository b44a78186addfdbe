"""Worker-loop benchmark: N jobs of known, uneven durations over W worker processes sharing one ledger
on local disk. Prints makespan / ideal makespan (target <= 1.10) and the claim overhead per job
(target < 50 ms), then one JSON line.

    python benchmarks/scheduler.py [--jobs 40] [--workers 4] [--seed 0]

The workers are real `distrain.orchestration.worker.run_worker` processes against the real ledger (heartbeat
threads, lease files, exclusive claims, the aggregation claim); only the job body sleeps for the job's
duration instead of training, so the figures isolate what the scheduler adds.
Ideal makespan = max(sum of durations / W, longest job): no schedule can beat it. The makespan is
from starting the workers to the aggregation being done (what a user waits for); the time until the
idle workers have noticed and exited (one poll later) is printed too.
"""

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORKER = Path(__file__).resolve().parents[1] / "tests" / "scripts" / "ledger_worker.py"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--jobs", type=int, default=40)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--min-s", type=float, default=0.5)
    ap.add_argument("--max-s", type=float, default=2.0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    durations = [round(rng.uniform(args.min_s, args.max_s), 3) for _ in range(args.jobs)]
    ideal = max(sum(durations) / args.workers, max(durations))
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp)
        env = {"LEASE_S": "5.0", "POLL_S": "0.2", "PATH": "/usr/bin:/bin"}
        wall_start, start = time.time(), time.perf_counter()
        procs = [
            subprocess.Popen(
                [sys.executable, str(WORKER), str(run_dir), str(args.jobs), json.dumps(durations)], env=env
            )
            for _ in range(args.workers)
        ]
        codes = [p.wait() for p in procs]
        makespan = time.perf_counter() - start
        claims = [json.loads(line) for line in (run_dir / "claims.log").read_text().splitlines()]
        aggregations = [json.loads(p.read_text()) for p in (run_dir / "aggregated").iterdir()]
    aggregated = len(aggregations)
    to_report = aggregations[0]["time"] - wall_start  # when the last job's results were aggregated
    assert codes == [0] * args.workers, codes
    assert sorted(c["job"] for c in claims) == sorted(f"job{i:03d}" for i in range(args.jobs)), "a job ran twice"
    claim_ms = [c["seconds"] * 1000 for c in claims]
    figures = {
        "benchmark": "scheduler",
        "jobs": args.jobs,
        "workers": args.workers,
        "sum_job_s": round(sum(durations), 3),
        "ideal_makespan_s": round(ideal, 3),
        "makespan_s": round(makespan, 3),
        "makespan_ratio": round(to_report / ideal, 4),
        "report_after_s": round(to_report, 3),
        "all_workers_exited_ratio": round(makespan / ideal, 4),
        "claim_ms_mean": round(statistics.mean(claim_ms), 3),
        "claim_ms_p95": round(sorted(claim_ms)[int(0.95 * len(claim_ms)) - 1], 3),
        "claim_ms_max": round(max(claim_ms), 3),
        "aggregations": aggregated,
    }
    print(f"{args.jobs} jobs ({args.min_s}-{args.max_s} s, sum {sum(durations):.1f} s) on {args.workers} workers")
    print(
        f"makespan (start to aggregation done) {to_report:.2f} s vs ideal {ideal:.2f} s: ratio {to_report / ideal:.3f} "
        f"(target <= 1.10); all workers exited after {makespan:.2f} s (ratio {makespan / ideal:.3f})"
    )
    print(
        f"claim overhead per job: mean {figures['claim_ms_mean']:.2f} ms, p95 {figures['claim_ms_p95']:.2f} ms, "
        f"max {figures['claim_ms_max']:.2f} ms (target < 50 ms)"
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
