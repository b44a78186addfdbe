"""Fault injection over real tiny training jobs and a real `mlflow server`: a SIGKILL storm, an owner and an
aggregator frozen past their leases, and a tracking server that is down, then flaky, while syncs race."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time

import pytest
from faults import FlakyProxy, Worker, assert_one_run_per_job, mlflow_tree
from mlflow.tracking import MlflowClient

from distrain.orchestration.ledger import Ledger, aggregate_id

from conftest import child_env, mlflow_server

pytestmark = pytest.mark.slow

EPOCHS = 3
FAST_LEASES = [
    "scheduler.lease_timeout_s=3",
    "scheduler.heartbeat_s=0.5",
    "scheduler.poll_s=0.3",
    "scheduler.checkpoint_every_s=0.3",
    "scheduler.max_lost_leases=100",
]


def tiny(experiment: str, uri: str, seeds: str = "[1]") -> list[str]:
    return [
        "model.names=[test_resnet]",
        "data.image_size=16",
        "cv.folds=2",
        f"cv.seeds={seeds}",
        f"train.epochs={EPOCHS}",
        "train.progress=false",
        "ensemble.max_rounds=20",
        f"experiment={experiment}",
        f"tracking.uri={uri}",
        *FAST_LEASES,
    ]


def job_ids(seeds: list[int]) -> list[str]:
    return [f"test_resnet-s{s}-f{f}" for s in seeds for f in (0, 1)]


def ends(ledger: Ledger, job_id: str) -> list:
    return [(a.end or {}).get("status") for a in ledger.attempts(job_id)]


def start_time(run) -> int:
    return run.info.start_time


def what_tracking_left(client: MlflowClient, experiment: str, cwd) -> str:
    """For a failure message: every run of the experiment (deleted ones too), the run records, the buffers and
    what the workers said about MLflow."""
    from mlflow.entities import ViewType

    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], run_view_type=ViewType.ALL, max_results=1000) if exp else []
    keys = ("distrain.kind", "distrain.create_token", "worker", "attempt")
    lines = [f"run {r.info.run_name} {r.info.run_id} {r.info.status} {r.info.lifecycle_stage} {r.info.start_time} "
             f"{[r.data.tags.get(k) for k in keys]}" for r in sorted(runs, key=start_time)]  # fmt: skip
    run_dir = cwd / "runs" / experiment
    lines += [f"record {p.name}: {p.read_text()}" for p in sorted(run_dir.glob("mlflow/*/*.json"))]
    lines += [f"buffer {p.name}: {len(p.read_text().splitlines())} calls" for p in run_dir.glob("tracking-buffer/*")]
    for log in sorted(cwd.glob("*.log")):
        lines += [f"{log.name}: {ln}" for ln in log.read_text().splitlines() if "MLflow" in ln or "Error" in ln]
    return "\n".join(lines)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-server")
    with mlflow_server(f"sqlite:///{root / 'store.db'}", root) as url:
        yield url


class BusyLoop:
    """A process spinning on the CPUs this test may use, until `stop()`."""

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@pytest.fixture
def cpu_contention():
    """A busy loop beside the test: the storm once left two MLflow runs for one job, and a flaky proxy 7 runs for 6
    jobs, only on a loaded machine (a kill or a lost answer between the server's create and the run record), so
    these tests make the load themselves. A test may stop it once the part it loads is over."""
    busy = BusyLoop()
    try:
        yield busy
    finally:
        busy.stop()


def test_sigkill_storm_leaves_one_mlflow_run_per_job_with_full_histories(server, tmp_path, cpu_contention):
    """3 workers over 4 jobs, SIGKILLed at random moments while holding a job (and restarted) 10 times, beside a
    busy loop."""
    seeds, rng, kills = [1, 2], random.Random(7), 0
    overrides = tiny("storm", server, "[1,2]")
    workers = [Worker(tmp_path, overrides, f"w{i}") for i in range(3)]
    deadline = time.monotonic() + 400
    while kills < 10 and time.monotonic() < deadline:
        time.sleep(rng.uniform(0.3, 1.5))
        running = [w for w in workers if w.proc.poll() is None]
        if not running:
            break
        training = [w for w in running if "claimed" in w.text()]  # killed while holding a job, not starting up
        if not training:
            continue
        victim = rng.choice(training)
        victim.proc.send_signal(signal.SIGKILL)
        victim.wait()
        kills += 1
        workers[workers.index(victim)] = Worker(tmp_path, overrides, f"w{workers.index(victim)}-{kills}")
    cpu_contention.stop()  # the races it provokes are at kills and restarts; the survivors only finish the study
    assert all(w.wait(timeout=400) == 0 for w in workers), [w.text()[-2000:] for w in workers]
    assert kills >= 10
    run_dir, ids = tmp_path / "runs" / "storm", job_ids(seeds)
    ledger = Ledger(run_dir)
    assert all(ends(ledger, j).count("done") == 1 for j in ids), {j: ends(ledger, j) for j in ids}
    assert ends(ledger, aggregate_id(ids)).count("done") == 1
    expired = sum(ends(ledger, j).count("expired") for j in ids + [aggregate_id(ids)])
    assert expired >= 4  # most kills hit a worker holding a job, whose lease another worker took over
    try:
        assert_one_run_per_job(MlflowClient(server), "storm", ids, EPOCHS)
    except AssertionError as e:
        raise AssertionError(f"{e}\n{what_tracking_left(MlflowClient(server), 'storm', tmp_path)}") from None
    offline = sum(log.read_text().count("warning: MLflow at") for log in tmp_path.glob("*.log"))
    print(f"storm: {kills} kills, {expired} leases taken over, {len(ids)} jobs, one MLflow run each; {offline} "
          f"worker(s) went offline")  # fmt: skip


def test_frozen_owner_and_frozen_aggregator_publish_nothing_when_they_wake(server, tmp_path):
    """A is frozen (SIGSTOP) while training; B takes the job over after the lease, finishes both jobs and is
    frozen while aggregating; A wakes, finds its job taken, aggregates after B's lease; B wakes last. Neither
    stale worker writes a checkpoint, a report or a model version."""
    overrides = tiny("frozen", server)
    a = Worker(tmp_path, overrides, "a")
    a.wait_for("claimed test_resnet-s1-f0")
    time.sleep(1.5)  # into training, past a checkpoint or two
    a.proc.send_signal(signal.SIGSTOP)
    b = Worker(tmp_path, overrides, "b")
    b.wait_for("aggregates (attempt 1)", timeout=240)
    b.proc.send_signal(signal.SIGSTOP)
    run_dir = tmp_path / "runs" / "frozen"
    report_before = (run_dir / "report.json").stat().st_mtime_ns if (run_dir / "report.json").exists() else None
    a.proc.send_signal(signal.SIGCONT)
    assert a.wait(timeout=240) == 0, a.text()
    b.proc.send_signal(signal.SIGCONT)
    assert b.wait(timeout=120) == 0, b.text()

    ids, ledger = job_ids([1]), Ledger(run_dir)
    assert ends(ledger, "test_resnet-s1-f0") == ["expired", "done"]
    assert ends(ledger, aggregate_id(ids)) == ["expired", "done"]
    assert report_before is None  # B was frozen before publishing anything
    assert not (run_dir / "jobs" / "test_resnet-s1-f0" / "state").exists()  # A wrote no checkpoint on waking
    report = json.loads((run_dir / "report.json").read_text())
    tree = assert_one_run_per_job(MlflowClient(server), "frozen", ids, EPOCHS)
    assert report["ensemble_model"]["version"] == tree["versions"][0].version
    assert report["mlflow"]["parent_run_id"] == tree["study"][0].info.run_id
    assert "test_resnet-s1-f0: taken over by another worker" in a.text()
    assert "_aggregate" in b.text() and "taken over by another worker" in b.text().split("aggregates (attempt 1)")[1]


def test_sync_during_training_two_concurrent_syncs_and_a_flaky_server(server, tmp_path, cpu_contention):
    """The worker starts while the server is down (everything buffered), the server comes back flaky
    (connections reset mid-request and stalled), two `distrain sync` run while the worker still trains and
    a third races the worker's own sync after aggregation, beside a busy loop: one study run, one run per job,
    one model version, and report.json names the live study run."""
    port = int(server.rsplit(":", 1)[1])
    proxy = FlakyProxy(port, mode="down", reset=0.25, stall=0.15, seed=3)
    overrides = [*tiny("flaky", proxy.url, "[1,2]"), "train.epochs=4"]
    worker = Worker(tmp_path, overrides, "w")
    worker.wait_for("claimed test_resnet-s1-f1")  # its first job is buffered: the study run is a placeholder
    proxy.mode = "flaky"
    sync = [sys.executable, "-m", "distrain.cli", "sync", "--run-dir", "runs/flaky"]
    syncs = [subprocess.Popen(sync, cwd=tmp_path, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for _ in range(2)]  # fmt: skip
    outs = [p.communicate(timeout=300)[0] for p in syncs]
    late = subprocess.Popen(sync, cwd=tmp_path, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)  # fmt: skip
    assert worker.wait(timeout=400) == 0, worker.text()
    outs.append(late.communicate(timeout=300)[0])
    final = subprocess.run(sync, cwd=tmp_path, env=child_env(), capture_output=True, text=True, timeout=300)
    assert all("Traceback" not in o for o in outs + [final.stdout + final.stderr]), outs
    assert final.returncode == 0 and proxy.resets > 0, (final.stdout, final.stderr, proxy.resets)

    ids = job_ids([1, 2])
    tree = assert_one_run_per_job(MlflowClient(server), "flaky", ids, 4)
    report = json.loads((tmp_path / "runs" / "flaky" / "report.json").read_text())
    assert report["mlflow"]["parent_run_id"] == tree["study"][0].info.run_id
    assert report["ensemble_model"]["version"] == tree["versions"][0].version
    assert len(tree["ensembles"]) == 2 and mlflow_tree(MlflowClient(server), "flaky")["study"]
    print(f"flaky: {proxy.connections} connections, {proxy.resets} reset, {proxy.stalls} stalled")
