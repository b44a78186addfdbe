"""`distrain sweep` end to end: two workers share 8 trial slots over one Optuna storage (SQLite in the run
directory, or a real PostgreSQL server), one worker is SIGKILLed mid-trial, the pruner stops trials early,
each trial is a nested MLflow run, and the best config is written out."""

import contextlib
import json
import re
import signal
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

from distrain.config import load_config
from distrain.orchestration.ledger import Ledger

from conftest import child_env, distrain_cli, e2e_timeout, last_line, postgres_server, run_cmd

TRIALS = 8
BASE = [
    "model.names=[test_resnet]",
    "data.image_size=16",
    "cv.folds=2",
    "train.epochs=3",
    "train.progress=false",
    "scheduler.lease_timeout_s=4",
    "scheduler.heartbeat_s=1",
    "scheduler.poll_s=0.5",
    "sweep.startup_trials=3",
    "sweep.pruner_startup_trials=2",
]
SPACE = "optim.lr: {low: 1.0e-4, high: 1.0, log: true}\noptim.weight_decay: {low: 1.0e-5, high: 1.0e-2, log: true}\n"


def sweep_cmd(*extra):
    return [sys.executable, "-m", "distrain.cli", "sweep", "--space", "space.yaml", "--trials", str(TRIALS), *extra]


def start_worker(cwd, log, *overrides):
    out = open(log, "w")
    return subprocess.Popen(
        sweep_cmd(*BASE, *overrides), cwd=cwd, stdout=out, stderr=subprocess.STDOUT, text=True, env=child_env()
    )


PG_PASSWORD = "sweep-db-secret"


def wait_for(pattern, log, proc, timeout):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if re.search(pattern, log.read_text()):
            return
        assert proc.poll() is None, log.read_text()[-3000:]
        time.sleep(0.1)
    pytest.fail(f"{pattern!r} not seen in {log}: {log.read_text()[-2000:]}")


@pytest.mark.slow
@pytest.mark.parametrize("storage", ["postgresql"])
def test_two_workers_share_the_trials_a_killed_workers_trial_is_failed_and_the_pruner_stops_some(
    tmp_path, storage, monkeypatch
):
    """On a PostgreSQL server, as a multi-machine sweep runs (the default SQLite file goes through the same
    Optuna RDB storage: test_a_sweep_on_the_default_sqlite_storage_...). PostgreSQL asks for a password, which
    every worker takes from PGPASSWORD (the URL holds none)."""
    (tmp_path / "space.yaml").write_text(SPACE)
    monkeypatch.setenv("PGPASSWORD", PG_PASSWORD)  # the workers' environment is this process's (child_env)
    server = postgres_server(password=PG_PASSWORD) if storage == "postgresql" else contextlib.nullcontext("")
    with server as url:
        extra = [f"sweep.storage={url}"] if url else []
        victim = start_worker(tmp_path, tmp_path / "a.log", *extra)
        wait_for(r"trial-\d{4}: trial \d+: optim", tmp_path / "a.log", victim, e2e_timeout(180))
        survivor = start_worker(tmp_path, tmp_path / "b.log", *extra)
        time.sleep(1.0)  # the victim is inside its first trial's training
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        assert survivor.wait(timeout=e2e_timeout(600)) == 0, (tmp_path / "b.log").read_text()[-3000:]
        b_log = (tmp_path / "b.log").read_text()
        best = run_cmd(sweep_cmd(*BASE, *extra, "--write-best", "best.yaml"), tmp_path)
        assert best.returncode == 0, best.stderr[-2000:]
        import optuna

        db = url or f"sqlite:///{tmp_path}/runs/digits-sweep/optuna.db"
        trials = optuna.load_study(study_name="digits-sweep", storage=db).trials
    run_dir = tmp_path / "runs" / "digits-sweep"
    states = [t.state.name for t in trials]
    assert "RUNNING" not in states  # the killed worker's trial was marked failed
    assert states.count("COMPLETE") + states.count("PRUNED") == TRIALS  # every slot's trial ran to its end, once
    assert states.count("FAIL") >= 1 and "of a vanished worker marked failed" in b_log
    assert states.count("PRUNED") >= 1  # the pruner stopped at least one trial early
    pruned = [t for t in trials if t.state.name == "PRUNED"]
    assert any(len(t.intermediate_values) < 3 for t in pruned)  # stopped before its last epoch
    ledger = Ledger(run_dir)
    for n in range(TRIALS):
        ends = [(a.end or {}).get("status") for a in ledger.attempts(f"trial-{n:04d}")]
        assert ends.count("done") == 1, (n, ends)
    assert any(ledger.attempts(f"trial-{n:04d}")[0].end["status"] == "expired" for n in range(TRIALS))
    summary = json.loads((run_dir / "sweep.json").read_text())
    assert summary["counts"]["RUNNING"] == 0 and len(summary["trials"]) == len(trials)
    assert "<- best" in b_log and "sweep: " in b_log
    cfg = load_config(tmp_path / "best.yaml")
    assert cfg.optim.lr == pytest.approx(summary["best"]["params"]["optim.lr"]) and cfg.experiment == "digits"
    assert summary["best"]["value"] == max(t.value for t in trials if t.state.name == "COMPLETE")

    (marker,) = (m for m in (run_dir / "mlflow").glob("*/study-000001.json"))
    marker = json.loads(marker.read_text())
    client = MlflowClient(marker["tracking_uri"])
    runs = client.search_runs([marker["experiment_id"]], filter_string="tags.`distrain.kind` = 'trial'")
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {marker["run_id"]}  # nested in the sweep run
    finished = [r for r in runs if r.info.status == "FINISHED"]
    assert len(finished) == TRIALS and all("optim.lr" in r.data.params for r in finished)
    complete = next(r for r in finished if "trial_accuracy" in r.data.metrics)
    assert len(client.get_metric_history(complete.info.run_id, "val_accuracy")) == 3  # per epoch
    leaked = [p for p in (tmp_path / "runs").rglob("*") if p.is_file() and PG_PASSWORD.encode() in p.read_bytes()]
    assert not leaked  # neither the run directories nor the MLflow store (runs/mlflow.db) hold the password


def sweep_in_process(capsys, monkeypatch, tmp_path, *extra):
    """`distrain sweep` through the CLI's own main, in this process (a refusal needs no interpreter start)."""
    monkeypatch.chdir(tmp_path)
    return distrain_cli(capsys, *sweep_cmd(*BASE, *extra)[3:])


@pytest.mark.parametrize(
    "space, message",
    [
        ("optim.lrr: {low: 0.1, high: 1.0}\n", "space: optim.lrr: unknown config key"),
        ("optim.lr: {low: 0.1, high: 0.01}\n", "space: optim.lr: impossible range"),
    ],
)
def test_bad_space_exits_2_with_one_line_before_anything_is_written(tmp_path, space, message, capsys, monkeypatch):
    (tmp_path / "space.yaml").write_text(space)
    proc = sweep_in_process(capsys, monkeypatch, tmp_path)
    assert proc.returncode == 2 and message in last_line(proc.stderr), proc.stderr[-2000:]
    assert not (tmp_path / "runs").exists()


def test_unreachable_storage_is_one_line_and_a_password_is_never_in_the_url(tmp_path, capsys, monkeypatch):
    """The password comes from the environment (PGPASSWORD), as the refusal of one in the URL asks."""
    (tmp_path / "space.yaml").write_text(SPACE)
    monkeypatch.setenv("PGPASSWORD", "secret")
    proc = sweep_in_process(capsys, monkeypatch, tmp_path, "sweep.storage=postgresql://me@127.0.0.1:1/none")
    line = last_line(proc.stderr)
    assert proc.returncode == 2 and "sweep.storage: cannot open postgresql://***@127.0.0.1:1/none" in line, line
    assert "secret" not in proc.stderr + proc.stdout and not (tmp_path / "runs").exists()
    proc = sweep_in_process(capsys, monkeypatch, tmp_path, "sweep.storage=postgresql://me:secret@127.0.0.1:1/none")
    line = last_line(proc.stderr)
    assert proc.returncode == 2 and "sweep.storage: the URL holds a password" in line and "PGPASSWORD" in line
    assert "secret" not in proc.stderr + proc.stdout and not (tmp_path / "runs").exists()


def test_a_sweep_on_the_default_sqlite_storage_completes_and_writes_the_best_config(
    tmp_path, capsys, monkeypatch, fresh_accelerate_state
):
    """One worker, in this process, on the SQLite file in the run directory: every trial ends once, and
    `--write-best` writes a config with the best trial's values."""
    import optuna

    (tmp_path / "space.yaml").write_text(SPACE)
    proc = sweep_in_process(capsys, monkeypatch, tmp_path, "train.epochs=1", "--trials", "3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "runs" / "digits-sweep"
    trials = optuna.load_study(study_name="digits-sweep", storage=f"sqlite:///{run_dir}/optuna.db").trials
    states = [t.state.name for t in trials]
    assert len(states) == 3 and set(states) <= {"COMPLETE", "PRUNED"} and "COMPLETE" in states, states
    best = sweep_in_process(capsys, monkeypatch, tmp_path, "train.epochs=1", "--trials", "3", "--write-best",
                            "best.yaml")  # fmt: skip
    assert best.returncode == 0, best.stderr[-2000:]
    summary = json.loads((run_dir / "sweep.json").read_text())
    assert summary["best"]["value"] == max(t.value for t in trials if t.state.name == "COMPLETE")
    assert load_config(tmp_path / "best.yaml").optim.lr == pytest.approx(summary["best"]["params"]["optim.lr"])
