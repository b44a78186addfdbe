"""Processes that open the same run directory's tracker and start the same job at the same moment (workers
starting together; an owner whose lease ran out under load and the worker that took the job over) settle on one
study run and one job run, every one of them logging to those."""

import json
import subprocess
import sys
import time

import pytest
from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient

from conftest import child_env

pytestmark = pytest.mark.slow

STARTER = """
import json, sys, time
from pathlib import Path
from distrain.tracking.mlflow_tracker import MlflowTracker

root, worker = Path(sys.argv[1]), sys.argv[2]
(root / f"ready-{worker}").touch()
while not (root / "go").exists():
    time.sleep(0.005)
t = MlflowTracker(f"sqlite:///{root / 'mlflow.db'}", "x", root / "runs" / "x", root / "runs", worker=worker)
run = t.start_job("m-s1-f0", {"lr": 0.1}, {"worker": worker})
t.log_metrics(run, {"val_accuracy": 0.5}, step=0)
print(json.dumps({"study": t.parent_run_id, "run": run, "offline": t.offline}))
"""


def test_processes_starting_the_same_job_together_share_one_study_run_and_one_job_run(tmp_path):
    (tmp_path / "runs" / "x").mkdir(parents=True)
    workers = [f"w{i}" for i in range(4)]
    procs = [subprocess.Popen([sys.executable, "-c", STARTER, str(tmp_path), w], env=child_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for w in workers]  # fmt: skip
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"ready-{w}").exists() for w in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    (tmp_path / "go").touch()
    outs = [p.communicate(timeout=180) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    said = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert not any(s["offline"] for s in said), outs
    assert len({s["study"] for s in said}) == 1 and len({s["run"] for s in said}) == 1, said
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("x").experiment_id], run_view_type=ViewType.ACTIVE_ONLY)
    kinds = sorted((r.data.tags["distrain.kind"], r.info.run_id) for r in runs)
    assert kinds == sorted([("job", said[0]["run"]), ("study", said[0]["study"])]), kinds
    assert [m.step for m in client.get_metric_history(said[0]["run"], "val_accuracy")] == [0]
