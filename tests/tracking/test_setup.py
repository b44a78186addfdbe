"""A tracker built from its config section without side effects on the process (MLflow's HTTP bounds apply
around each of its calls only), and the optional system metrics on a job's run."""

import os
import socket
import time

import pytest
from mlflow.tracking import MlflowClient

from distrain.config import TrackingConfig
from distrain.tracking.client import http_settings
from distrain.tracking.mlflow_tracker import MlflowTracker


@pytest.fixture
def clean_env(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for key in http_settings(1, 1):
        monkeypatch.delenv(key, raising=False)


def test_from_config_resolves_the_store_and_experiment_as_the_run_does(tmp_path, clean_env):
    run_dir = tmp_path / "runs" / "digits"
    t = MlflowTracker.from_config(TrackingConfig(), run_dir, "digits", worker="w0")
    assert t.tracking_uri == f"sqlite:///{(tmp_path / 'runs' / 'mlflow.db').resolve()}"
    assert t.experiment_name == "digits" and t.buffer_path == run_dir / "tracking-buffer" / "w0.jsonl"
    named = MlflowTracker.from_config(TrackingConfig(experiment_name="shared"), run_dir.with_name("other"), "digits")
    client = MlflowClient(t.tracking_uri)
    assert client.get_experiment(named.experiment_id).name == "shared" != client.get_experiment(t.experiment_id).name


def test_construction_and_calls_leave_the_environment_as_it_was_and_bound_each_call(tmp_path, clean_env, monkeypatch):
    seen = []
    search = MlflowClient.search_runs
    monkeypatch.setattr(
        MlflowClient, "search_runs", lambda self, *a, **kw: seen.append(dict(os.environ)) or search(self, *a, **kw)
    )
    before = dict(os.environ)
    t = MlflowTracker.from_config(TrackingConfig(timeout_s=3, max_retries=2), tmp_path / "runs" / "x", "x")
    run = t.start_job("m-s1-f0", {}, {})
    t.end_run(run)
    assert dict(os.environ) == before
    assert seen and all(
        (env["MLFLOW_HTTP_REQUEST_TIMEOUT"], env["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]) == ("3", "2") for env in seen
    )


def test_a_dead_server_neither_stalls_construction_nor_touches_the_environment(tmp_path, clean_env):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    before = dict(os.environ)
    start = time.monotonic()
    tc = TrackingConfig(uri=f"http://127.0.0.1:{port}", timeout_s=1, max_retries=1)
    t = MlflowTracker.from_config(tc, tmp_path / "runs" / "x", "x")
    assert t.offline and t.start_job("m-s1-f0", {}, {}).startswith("local-")
    assert time.monotonic() - start < 15 and dict(os.environ) == before


def test_system_metrics_are_logged_on_the_job_run_while_it_trains(tmp_path, clean_env):
    pytest.importorskip("psutil")
    t = MlflowTracker.from_config(TrackingConfig(system_metrics=True), tmp_path / "runs" / "x", "x")
    t.system_metrics_interval_s = 0.2
    run = t.start_job("m-s1-f0", {}, {})
    time.sleep(1.5)
    t.end_run(run)
    metrics = MlflowClient(t.tracking_uri).get_run(run).data.metrics
    assert any(key.startswith("system/cpu_utilization") for key in metrics), sorted(metrics)
    assert any(key.startswith("system/system_memory_usage") for key in metrics), sorted(metrics)
    assert not t._monitors


def test_system_metrics_are_off_by_default(tmp_path, clean_env):
    t = MlflowTracker.from_config(TrackingConfig(), tmp_path / "runs" / "x", "x")
    t.system_metrics_interval_s = 0.2
    run = t.start_job("m-s1-f0", {}, {})
    time.sleep(0.5)
    t.end_run(run)
    assert not [k for k in MlflowClient(t.tracking_uri).get_run(run).data.metrics if k.startswith("system/")]
