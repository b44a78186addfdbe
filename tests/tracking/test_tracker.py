"""The MLflow tracker in-process against a real SQLite store: runs reused, rows not repeated."""

from mlflow.tracking import MlflowClient

from distrain.tracking.buffer import sync_buffers
from distrain.tracking.mlflow_tracker import MlflowTracker


def test_a_resumed_attempt_buffered_offline_adds_no_second_row_at_sync(tmp_path):
    """Attempt 1 logs epochs 0-2 and dies; attempt 2 resumes mid-epoch 2 while the server is down, so it cannot
    read which steps the run holds and buffers epochs 2 and 3; sync sends epoch 3 only."""
    uri, run_root = f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "runs"
    run_dir = run_root / "x"
    run_dir.mkdir(parents=True)
    first = MlflowTracker(uri, "x", run_dir, run_root, worker="a")
    run = first.start_job("m-s1-f0", {}, {})
    for step in range(3):
        first.log_metrics(run, {"val_accuracy": step / 10, "lr": 0.1}, step)
    second = MlflowTracker(uri, "x", run_dir, run_root, worker="b")
    second._go_offline(ConnectionError("the server is down"))
    assert second.start_job("m-s1-f0", {}, {}) == run  # the job's run, from the run records
    for step in (2, 3):
        second.log_metrics(run, {"val_accuracy": 1 + step / 10, "lr": 0.2}, step)
    second.end_run(run)
    assert sync_buffers(MlflowTracker(uri, "x", run_dir, run_root, worker="sync"))["synced"] > 0
    client = MlflowClient(uri)
    for key, firsts in (("val_accuracy", [0.0, 0.1, 0.2]), ("lr", [0.1] * 3)):
        history = sorted((m.step, m.value) for m in client.get_metric_history(run, key))
        assert [s for s, _ in history] == [0, 1, 2, 3], (key, history)  # one row per epoch
        assert [v for _, v in history[:3]] == firsts  # attempt 1's rows stand
    assert client.get_run(run).info.status == "FINISHED"


def test_an_ensemble_stage_is_reused_only_with_the_same_params_and_keeps_one_row_per_step(tmp_path):
    """`distrain aggregate` again with the same settings reuses the voting run (no second row at step 0); with
    other ensemble settings it gets a run of its own, since MLflow would keep the first run's params."""
    uri, run_root = f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "runs"
    (run_root / "x").mkdir(parents=True)
    plan = {"distrain.plan": "abc"}
    runs = []
    for vote_fraction, score in ((0.6, 0.9), (0.6, 0.9), (0.8, 0.8)):
        tracker = MlflowTracker(uri, "x", run_root / "x", run_root, worker="a")
        runs.append(tracker.child_run("voting", {"ensemble.vote_fraction": vote_fraction}, plan))
        tracker.log_metrics(runs[-1], {"soft_vote_cv": score}, step=0)
        tracker.end_run(runs[-1])
    assert runs[0] == runs[1] != runs[2]
    client = MlflowClient(uri)
    assert [m.value for m in client.get_metric_history(runs[0], "soft_vote_cv")] == [0.9]
    assert client.get_run(runs[2]).data.params["ensemble.vote_fraction"] == "0.8"
