"""The MLflow tracker in-process against a real SQLite store: one row per (metric, step) in a job's run whatever
the attempts and syncs did, ensemble runs reused only for the same settings, re-aggregations recorded."""

from mlflow.tracking import MlflowClient

from distrain.errors import Preempted
from distrain.tracking import buffer
from distrain.tracking.buffer import sync_buffers
from distrain.tracking.mlflow_tracker import MlflowTracker


def tracker(tmp_path, worker: str, offline: bool = False) -> MlflowTracker:
    (tmp_path / "runs" / "x").mkdir(parents=True, exist_ok=True)
    t = MlflowTracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "x", tmp_path / "runs" / "x", tmp_path / "runs",
                      worker=worker)  # fmt: skip
    if offline:
        t._go_offline(ConnectionError("the server is down"))
    return t


def history(tmp_path, run_id: str, key: str) -> list[tuple[int, float]]:
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_a_resumed_attempt_buffered_offline_adds_no_second_row_at_sync(tmp_path):
    """Attempt 1 logs epochs 0-2 and dies; attempt 2 resumes mid-epoch 2 while the server is down, so it cannot
    read which steps the run holds and buffers epochs 2 and 3; sync sends epoch 3 only."""
    first = tracker(tmp_path, "a")
    run = first.start_job("m-s1-f0", {}, {})
    for step in range(3):
        first.log_metrics(run, {"val_accuracy": step / 10, "lr": 0.1}, step)
    second = tracker(tmp_path, "b", offline=True)
    assert second.start_job("m-s1-f0", {}, {}) == run  # the job's run, from the run records
    for step in (2, 3):
        second.log_metrics(run, {"val_accuracy": 1 + step / 10, "lr": 0.2}, step)
    second.end_run(run)
    assert sync_buffers(tracker(tmp_path, "sync"))["synced"] > 0
    assert history(tmp_path, run, "val_accuracy") == [(0, 0.0), (1, 0.1), (2, 0.2), (3, 1.3)]  # attempt 1's stand
    assert history(tmp_path, run, "lr") == [(0, 0.1), (1, 0.1), (2, 0.1), (3, 0.2)]


def test_both_attempts_offline_replayed_out_of_order_by_an_interrupted_sync_leave_one_row_per_step(
    tmp_path, monkeypatch
):
    """Attempt 1 (worker "z") creates the run offline and logs epochs 0-2; attempt 2 (worker "a", whose buffer
    file sync replays first) reopens it and logs epochs 2 and 3. The first sync is stopped by SIGTERM right after
    replaying attempt 2's reopening; the next sync, a new process, goes on from there."""
    first = tracker(tmp_path, "z", offline=True)
    placeholder = first.start_job("m-s1-f0", {}, {})
    for step in range(3):
        first.log_metrics(placeholder, {"val_accuracy": step / 10}, step)
    second = tracker(tmp_path, "a", offline=True)
    assert second.start_job("m-s1-f0", {}, {}) == placeholder
    for step in (2, 3):
        second.log_metrics(placeholder, {"val_accuracy": 1 + step / 10}, step)
    syncing = tracker(tmp_path, "sync-1")
    replayed = []
    execute = syncing.execute
    monkeypatch.setattr(syncing, "execute", lambda op, ids: replayed.append(op.OP) or execute(op, ids))
    monkeypatch.setattr(buffer.interrupts, "stop_requested", lambda: bool(replayed) and replayed[-1] == "reopen_run")
    try:
        sync_buffers(syncing)
        raise AssertionError("the sync was not stopped")
    except Preempted:
        pass
    monkeypatch.undo()
    sync_buffers(tracker(tmp_path, "sync-2"))
    run = syncing.records.latest("job-m-s1-f0")[1]["run_id"]
    assert not run.startswith("local-")
    assert [s for s, _ in history(tmp_path, run, "val_accuracy")] == [0, 1, 2, 3]


def test_an_ensemble_stage_is_reused_only_with_the_same_params_and_shows_its_latest_scores(tmp_path):
    """`distrain aggregate` again with the same settings reuses the voting run, whose latest score is the new
    one; other settings get a run of their own (MLflow would keep the first run's params)."""
    plan = {"distrain.plan": "abc"}
    runs = []
    for vote_fraction, score in ((0.6, 0.9), (0.6, 0.85), (0.8, 0.8)):
        t = tracker(tmp_path, "a")
        runs.append(t.child_run("voting", {"ensemble.vote_fraction": vote_fraction}, plan))
        t.log_metrics(runs[-1], {"soft_vote_cv": score}, step=0)
        t.end_run(runs[-1])
    assert runs[0] == runs[1] != runs[2]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert client.get_run(runs[0]).data.metrics["soft_vote_cv"] == 0.85
    assert client.get_run(runs[2]).data.params["ensemble.vote_fraction"] == "0.8"


def test_a_study_aggregated_again_at_the_same_size_records_the_new_summary(tmp_path):
    """A damaged job trained again: the study run is reopened and its summary logged at the same step (the number
    of jobs); the new figures are its latest."""
    first = tracker(tmp_path, "a")
    first.log_metrics(first.parent_run_id, {"soft_vote_cv": 0.5}, step=8)
    again = tracker(tmp_path, "b")
    again.start_job("m-s1-f0", {}, {})  # marks the study run RUNNING again (a reopening)
    again.log_metrics(again.parent_run_id, {"soft_vote_cv": 0.7}, step=8)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert client.get_run(again.parent_run_id).data.metrics["soft_vote_cv"] == 0.7
