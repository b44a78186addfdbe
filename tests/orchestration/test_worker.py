"""The ledger and worker loop: atomic claims, lease expiry, retries, static shards, and a stress test
with real worker processes SIGKILLed at random moments."""

import json
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from distrain.config import SchedulerConfig
from distrain.distributed.ranks import Ranks
from distrain.errors import EXIT_FAILED_FOR_GOOD, EXIT_OK, EXIT_PREEMPTED
from distrain.orchestration.ledger import Ledger, aggregate_id
from distrain.orchestration.worker import WorkerSteps, parse_shard, run_worker, select_shard

from conftest import ledger_history

FAST = SchedulerConfig(heartbeat_s=0.05, poll_s=0.01)
QUIET = Ranks(log=lambda message: None)

WORKER = Path(__file__).parents[1] / "scripts" / "ledger_worker.py"


def assert_no_overlapping_owners(history: list[dict]) -> None:
    by_job: dict[str, list[dict]] = {}
    for row in history:
        by_job.setdefault(row["job"], []).append(row)
    for job, rows in by_job.items():
        rows.sort(key=lambda r: r["attempt"])
        for a, b in zip(rows, rows[1:]):
            assert a["end"] <= b["start"], (
                f"{job}: attempt {a['attempt']} ({a['worker']}) still alive at "
                f"{a['end']:.3f} after attempt {b['attempt']} started at {b['start']:.3f}"
            )


def test_claim_is_exclusive_and_expired_lease_is_taken_over(tmp_path):
    ledger = Ledger(tmp_path, lease_timeout_s=0.3)
    first = ledger.try_claim("j", "w1")
    assert first is not None and first.attempt == 1
    assert ledger.try_claim("j", "w2") is None  # running: not claimable
    assert ledger.state("j").status == "running" and ledger.state("j").owner == "w1"
    time.sleep(0.4)  # w1 stops heartbeating
    assert ledger.state("j").status == "pending"
    second = ledger.try_claim("j", "w2")
    assert second is not None and second.attempt == 2
    assert not ledger.owns(first) and not ledger.heartbeat(first)  # the old owner learns it lost the job
    assert not ledger.finish(first, "done")
    assert ledger.attempts("j")[0].end["status"] == "expired"
    assert ledger.finish(second, "done")
    st = ledger.state("j")
    assert st.status == "done" and st.lost == 1


def test_failed_attempts_up_to_max_retries_then_failed(tmp_path):
    ledger = Ledger(tmp_path, max_retries=2)
    for attempt in (1, 2):
        c = ledger.try_claim("j", "w")
        assert c.attempt == attempt
        ledger.finish(c, "failed", "RuntimeError: boom")
    st = ledger.state("j")
    assert st.status == "failed" and st.errors == 2 and st.last_error == "RuntimeError: boom"
    assert ledger.try_claim("j", "w") is None


def test_preempted_attempt_is_pending_again_and_does_not_count(tmp_path):
    ledger = Ledger(tmp_path, max_retries=1)
    c = ledger.try_claim("j", "w")
    ledger.finish(c, "preempted")
    st = ledger.state("j")
    assert st.status == "pending" and st.errors == 0
    assert ledger.try_claim("j", "w2").attempt == 2


def test_worker_marks_failing_job_failed_others_finish_and_aggregates_once(tmp_path):
    ledger = Ledger(tmp_path, max_retries=2)
    ran, aggregated = [], []

    def run_job(claim, beat):
        ran.append(claim.job_id)
        if claim.job_id == "b":
            raise RuntimeError("CUDA out of memory (simulated)")

    steps = WorkerSteps(run_job, lambda states, claim: aggregated.append([s.status for s in states]))
    out = run_worker(ledger, ["a", "b", "c"], FAST, QUIET, steps, worker="w", stop=threading.Event())
    assert ran.count("b") == 2 and ran.count("a") == 1 and ran.count("c") == 1
    assert aggregated == [["done", "failed", "done"]]
    assert out.failed == ["b"] and out.exit_code == EXIT_FAILED_FOR_GOOD
    assert "CUDA out of memory" in ledger.state("b").last_error
    assert ledger.state(aggregate_id(["a", "b", "c"])).status == "done"


def test_sigterm_between_jobs_stops_before_the_next_claim_and_exits_0_once_nothing_is_left(tmp_path):
    """SIGTERM while a job runs: that job ends (here it finishes), no next job is claimed, exit 75 and the rest
    stays pending. The same signal when the last job and the aggregation are done: exit 0 (nothing was left)."""
    ledger, stop, ran = Ledger(tmp_path), threading.Event(), []

    def run_job(claim, beat):
        ran.append(claim.job_id)
        stop.set()  # the signal lands during the first job

    def worker(run_job):
        return run_worker(ledger, ["a", "b"], FAST, QUIET, WorkerSteps(run_job, lambda states, claim: None),
                          worker="w", stop=stop)  # fmt: skip

    out = worker(run_job)
    assert ran == ["a"] and out.preempted and out.exit_code == EXIT_PREEMPTED
    assert [s.status for s in ledger.states(["a", "b"])] == ["done", "pending"]

    stop.clear()
    finished = worker(lambda claim, beat: ran.append(claim.job_id))
    assert ran == ["a", "b"] and finished.exit_code == EXIT_OK
    stop.set()  # SIGTERM after everything is done
    late = worker(run_job)
    assert ran == ["a", "b"] and not late.preempted and late.exit_code == EXIT_OK


def test_parse_shard_and_static_selection():
    assert parse_shard("1/3", env={}) == (1, 3)
    assert parse_shard(None, env={"JOB_COMPLETION_INDEX": "2", "DISTRAIN_NUM_SHARDS": "4"}) == (2, 4)
    assert parse_shard(None, env={}) is None
    for bad in ("3/3", "x", "1/0", "-1/2"):
        with pytest.raises(ValueError, match="--shard"):
            parse_shard(bad, env={})
    with pytest.raises(ValueError, match="DISTRAIN_NUM_SHARDS"):
        parse_shard(None, env={"JOB_COMPLETION_INDEX": "0"})
    ids = [f"j{i}" for i in range(7)]
    shards = [select_shard(ids, (i, 3)) for i in range(3)]
    assert shards[0] == ["j0", "j3", "j6"] and sorted(sum(shards, [])) == sorted(ids)


def test_static_shards_each_train_their_own_jobs(tmp_path):
    ledger = Ledger(tmp_path)
    ids = [f"j{i}" for i in range(5)]
    ran = {0: [], 1: []}
    aggregations = []
    for i in (0, 1):
        steps = WorkerSteps(lambda c, b, i=i: ran[i].append(c.job_id), lambda s, c: aggregations.append(1))
        run_worker(ledger, ids, FAST, QUIET, steps, worker=f"w{i}", stop=threading.Event(), shard=(i, 2))
    assert ran == {0: ["j0", "j2", "j4"], 1: ["j1", "j3"]}
    assert aggregations == [1]  # the second (last) shard to finish aggregated


def test_stress_three_workers_sigkilled_and_restarted(tmp_path):
    """3 worker processes x 12 jobs; workers are SIGKILLed at random moments and restarted until the
    run completes. Every job must end done exactly once, no two owners of one job may overlap in the
    ledger's history, and aggregation must complete exactly once."""
    n_jobs, lease = 12, 1.0
    rng = random.Random(1234)
    durations = [round(rng.uniform(0.3, 1.2), 2) for _ in range(n_jobs)]
    env = {**__import__("os").environ, "LEASE_S": str(lease)}

    def start():
        return subprocess.Popen(
            [sys.executable, str(WORKER), str(tmp_path), str(n_jobs), json.dumps(durations)], env=env
        )

    workers = [start() for _ in range(3)]
    kills = 0
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        time.sleep(rng.uniform(0.2, 0.9))
        running = [w for w in workers if w.poll() is None]
        if not running:
            break
        if kills < 8:
            victim = rng.choice(running)
            victim.send_signal(signal.SIGKILL)
            victim.wait()
            kills += 1
            workers[workers.index(victim)] = start()
    for w in workers:
        assert w.wait(timeout=120) == 0
    assert kills == 8

    ledger = Ledger(tmp_path, lease_timeout_s=lease)
    ids = [f"job{i:03d}" for i in range(n_jobs)]
    history = ledger_history(ledger, ids + [aggregate_id(ids)])
    for job in ids + [aggregate_id(ids)]:
        done = [r for r in history if r["job"] == job and r["status"] == "done"]
        assert len(done) == 1, (job, [r for r in history if r["job"] == job])
    assert_no_overlapping_owners(history)
    assert len(list((tmp_path / "aggregated").iterdir())) >= 1
    expired = [r for r in history if r["status"] == "expired"]
    assert expired, "no kill hit a running job: the test did not exercise lease takeover"
    print(f"stress: {kills} kills, {len(history)} attempts, {len(expired)} expired leases taken over")


def test_a_stale_owner_failing_after_a_takeover_leaves_the_new_owners_run_alone(tmp_path, monkeypatch):
    """A frozen owner, woken after another worker took its job over and finished it, fails on a file the new
    owner removed (its checkpoint rename: FileNotFoundError). That is a lost attempt (LeaseLost), and the job's
    MLflow run, the new owner's, is not ended FAILED; an owner that still holds the job fails as before."""
    from types import SimpleNamespace

    from distrain.errors import LeaseLost
    from distrain.orchestration.experiment import JobRunner
    from distrain.study.plan import Job
    from distrain.training import loop

    def fit_job(*args):
        raise FileNotFoundError("state/.state-000000029.pt.tmp -> state/state-000000029.pt")

    monkeypatch.setattr(loop, "fit_job", fit_job)
    ledger = Ledger(tmp_path, lease_timeout_s=0.2)
    stale = ledger.try_claim("m-s1-f0", "a")
    ended = []
    tracker = SimpleNamespace(start_job=lambda *a: "run-1", end_run=lambda run, status: ended.append(status))
    cfg = SimpleNamespace(run_dir=tmp_path, scheduler=SchedulerConfig(checkpoint_every_s=60))
    study = SimpleNamespace(cfg=cfg, run_dir=tmp_path, plan=[Job("m", 1, 0)], tracker=tracker, ledger=ledger,
                            ranks=Ranks(), worker="a", index=None, stop=threading.Event(),
                            manifest=SimpleNamespace(fold_of_sample={}), accelerator=None)  # fmt: skip
    monkeypatch.setattr("distrain.orchestration.phases.job_params", lambda cfg, job: {})
    beat = SimpleNamespace(progress={}, lost=SimpleNamespace(is_set=lambda: False))
    time.sleep(0.3)
    fresh = ledger.try_claim("m-s1-f0", "b")  # the lease expired: b takes the job over
    assert fresh is not None
    with pytest.raises(LeaseLost, match="failed after losing the job"):
        JobRunner(study).run(stale, beat)
    assert ended == []  # b's run is left alone
    with pytest.raises(FileNotFoundError):
        JobRunner(study).run(fresh, beat)
    assert ended == ["FAILED"]  # the owner's own failure ends its run
