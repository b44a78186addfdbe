"""A tracking server that is down never stalls training, and `distrain sync` later leaves the same
MLflow tree as a run that never lost it."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from distrain.errors import EXIT_PREEMPTED

from conftest import RUN_PY, child_env, distrain_cli, free_port, mlflow_server, run_cmd

pytestmark = pytest.mark.slow

TINY = [
    "model.names=[test_resnet]",
    "data.image_size=16",
    "cv.folds=2",
    "cv.seeds=[5]",
    "train.epochs=1",
    "train.progress=false",
    "ensemble.max_rounds=20",
]
# Keys whose values legitimately differ between the two runs (names, paths).
DIFFERENT = ("experiment", "tracking.experiment_name")


def _tree(client: MlflowClient, experiment: str) -> dict:
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    study = [r for r in runs if r.data.tags.get("distrain.kind") == "study"]
    assert len(study) == 1, [r.info.run_name for r in runs]
    tree = {}
    for r in runs:
        kind = r.data.tags.get("distrain.kind")
        if kind != "study":
            assert r.data.tags.get("mlflow.parentRunId") == study[0].info.run_id
        params = {k: v for k, v in r.data.params.items() if k not in DIFFERENT}
        metrics = {k: len(client.get_metric_history(r.info.run_id, k)) for k in r.data.metrics}
        artifacts = sorted(a.path for a in client.list_artifacts(r.info.run_id))
        tree[r.info.run_name.replace(experiment, "EXP")] = {
            "kind": kind,
            "status": r.info.status,
            "params": params,
            "metrics": metrics,
            "artifacts": artifacts,
        }
    return tree


def _sync_stopped_by_sigterm(cwd: Path, run_dir: Path) -> subprocess.CompletedProcess:
    """`distrain sync` sent SIGTERM once it has created a run: what it printed and its exit code."""
    sync = subprocess.Popen([sys.executable, "-m", "distrain.cli", "sync", "--run-dir", str(run_dir)], cwd=cwd,
                            env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    state = run_dir / "tracking-buffer" / "sync-state.json"
    deadline = time.monotonic() + 120
    while sync.poll() is None and time.monotonic() < deadline:
        progress = json.loads(state.read_text()) if state.is_file() else {}
        if any(progress.get("created", {}).values()):
            break
        time.sleep(0.01)
    sync.send_signal(signal.SIGTERM)
    out, _ = sync.communicate(timeout=60)
    return subprocess.CompletedProcess(sync.args, sync.returncode, out, "")


def test_dead_server_does_not_stall_and_sync_completes_the_tree(tmp_path, capsys, monkeypatch):
    """... and a sync stopped by SIGTERM part-way leaves nothing twice: the next sync completes the same tree."""
    port = free_port()
    uri = f"http://127.0.0.1:{port}"  # nothing listens here yet
    start = time.perf_counter()
    down = run_cmd(
        [sys.executable, str(RUN_PY), *TINY, "experiment=down", f"tracking.uri={uri}"], tmp_path, timeout=600
    )
    down_s = time.perf_counter() - start
    assert down.returncode == 0, down.stdout + down.stderr
    assert down.stderr.count("warning: MLflow at") == 1, down.stderr  # warned once
    assert (tmp_path / "runs" / "down" / "tracking-buffer").is_dir()

    monkeypatch.chdir(tmp_path)  # the run's config names its data relative to where it ran
    status = distrain_cli(capsys, "status", "--run-dir", str(tmp_path / "runs" / "down"))
    assert "tracking calls await `distrain sync`" in status.stdout

    early = distrain_cli(capsys, "sync", "--run-dir", "runs/down")
    assert early.returncode != 0 and "still unreachable" in early.stderr

    with mlflow_server(f"sqlite:///{tmp_path / 'server.db'}", tmp_path, port=port):
        stopped = _sync_stopped_by_sigterm(tmp_path, tmp_path / "runs" / "down")
        assert stopped.returncode == EXIT_PREEMPTED, stopped.stdout
        assert "stopped by SIGTERM with its progress saved" in stopped.stdout.strip().splitlines()[-1], stopped.stdout
        start = time.perf_counter()
        up = run_cmd(
            [sys.executable, str(RUN_PY), *TINY, "experiment=up", f"tracking.uri={uri}"], tmp_path, timeout=600
        )
        up_s = time.perf_counter() - start
        assert up.returncode == 0, up.stdout + up.stderr
        sync = distrain_cli(capsys, "sync", "--run-dir", "runs/down")
        assert sync.returncode == 0, sync.stdout + sync.stderr
        again = distrain_cli(capsys, "sync", "--run-dir", "runs/down")
        assert "nothing to sync" in again.stdout  # idempotent: nothing is sent twice

        client = MlflowClient(uri)
        tree_up, tree_down = _tree(client, "up"), _tree(client, "down")
        assert tree_down == tree_up
        assert {v["kind"] for v in tree_up.values()} == {"study", "job", "ensemble"}
        assert len([v for v in tree_up.values() if v["kind"] == "job"]) == 2
        for name in ("distrain-up", "distrain-down"):
            assert client.search_model_versions(f"name='{name}'")
        # report.json said "pending-sync" while offline; sync puts the registered version in it, locally
        # and in the copy uploaded to the study run
        (registered,) = client.search_model_versions("name='distrain-down'")
        local_report = json.loads((tmp_path / "runs" / "down" / "report.json").read_text())
        local = local_report["ensemble_model"]
        assert local == {
            "name": "distrain-down",
            "version": registered.version,
            "uri": f"models:/distrain-down/{registered.version}",
            "ensemble": local_report["ensemble_model"]["ensemble"],  # which ensemble it is: kept through sync
        }
        assert local["ensemble"] in local_report["ensembles"]
        study = local_report["mlflow"]["parent_run_id"]  # sync put the real study run in place of the placeholder
        assert client.get_run(study).data.tags["distrain.kind"] == "study"
        uploaded = json.loads(Path(client.download_artifacts(study, "report.json", str(tmp_path))).read_text())
        assert uploaded["ensemble_model"] == local
    print(f"server down: {down_s:.1f} s, server up: {up_s:.1f} s, ratio {down_s / up_s:.2f}; {sync.stdout.strip()}")
    assert down_s <= 1.5 * up_s
