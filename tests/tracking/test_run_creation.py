"""One MLflow run per job, study and ensemble stage whatever fails around its creation, against a real SQLite store:
a create whose answer was lost (with and without MLflow's HTTP retry sending it twice, online and through a
sync), an attempt killed between the server's create and the run record, two creators racing."""

import json
import time

from mlflow.tracking import MlflowClient

from distrain.tracking.buffer import sync_buffers
from distrain.tracking.mlflow_tracker import MlflowTracker
from distrain.tracking.runs import PARENT_TAG, TOKEN_TAG

JOB = "m-s1-f0"


def tracker(tmp_path, worker: str) -> MlflowTracker:
    (tmp_path / "runs" / "x").mkdir(parents=True, exist_ok=True)
    return MlflowTracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "x", tmp_path / "runs" / "x", tmp_path / "runs",
                         worker=worker)  # fmt: skip


def store(tmp_path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")


def job_tags(t: MlflowTracker) -> dict[str, str]:
    """The tags that make a run the job's (what the tracker's create puts on it)."""
    return {PARENT_TAG: t.parent_run_id, "distrain.kind": "job", "distrain.job_id": JOB}


def live_runs(tmp_path, kind: str) -> list:
    client = store(tmp_path)
    experiment = client.get_experiment_by_name("x").experiment_id
    return [r for r in client.search_runs([experiment]) if r.data.tags.get("distrain.kind") == kind]


def steps(tmp_path, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in store(tmp_path).get_metric_history(run_id, key))


def lose_the_answer(monkeypatch, times_sent: int = 1) -> list[str]:
    """MlflowClient.create_run commits the run (`times_sent` times: MLflow's HTTP retry sends a request again
    after a reset) and then raises as a connection reset after the commit would. Returns the created ids."""
    create, created = MlflowClient.create_run, []

    def lost(self, *args, **kwargs):
        for _ in range(times_sent):
            created.append(create(self, *args, **kwargs).info.run_id)
        raise ConnectionError("Connection reset by peer")

    monkeypatch.setattr(MlflowClient, "create_run", lost)
    return created


def test_a_job_run_whose_create_answer_was_lost_is_found_and_the_next_attempt_reopens_it(tmp_path, monkeypatch):
    first = tracker(tmp_path, "a")
    created = lose_the_answer(monkeypatch)
    run = first.start_job(JOB, {"lr": 0.1}, {"attempt": 1})
    monkeypatch.undo()
    assert created == [run] and not first.offline  # found by its create token: no second create, no offline
    first.log_metrics(run, {"val_accuracy": 0.5}, step=0)
    second = tracker(tmp_path, "b")
    assert second.start_job(JOB, {"lr": 0.1}, {"attempt": 2}) == run
    second.log_metrics(run, {"val_accuracy": 0.9}, step=0)  # already held: not sent twice
    second.log_metrics(run, {"val_accuracy": 0.6}, step=1)
    second.end_run(run)
    (job,) = live_runs(tmp_path, "job")
    assert job.info.run_id == run and job.info.status == "FINISHED"
    assert job.data.params == {"lr": "0.1"} and job.data.tags["attempt"] == "2"
    assert steps(tmp_path, run, "val_accuracy") == [0, 1]


def test_a_create_sent_twice_by_an_http_retry_keeps_the_first_run(tmp_path, monkeypatch):
    t = tracker(tmp_path, "a")
    created = lose_the_answer(monkeypatch, times_sent=2)
    run = t.start_job(JOB, {}, {})
    monkeypatch.undo()
    assert run == created[0] and len(created) == 2
    assert [r.info.run_id for r in live_runs(tmp_path, "job")] == [run]  # the second one deleted
    assert store(tmp_path).get_run(created[1]).info.lifecycle_stage == "deleted"


def test_a_lost_answer_with_the_server_gone_is_buffered_and_sync_adopts_the_committed_run(tmp_path, monkeypatch):
    """The create commits, the answer is lost and the look-up by token fails too: the tracker goes offline with a
    placeholder; sync replays the buffered create through the same path and finds the committed run."""
    t = tracker(tmp_path, "a")
    created = lose_the_answer(monkeypatch)
    monkeypatch.setattr(MlflowClient, "search_runs", _fails_after(created, MlflowClient.search_runs))
    placeholder = t.start_job(JOB, {"lr": 0.1}, {})
    assert t.offline and placeholder.startswith("local-")
    for step in range(2):
        t.log_metrics(placeholder, {"val_accuracy": step / 10}, step)
    t.end_run(placeholder)
    monkeypatch.undo()
    sync_buffers(tracker(tmp_path, "sync"))
    (job,) = live_runs(tmp_path, "job")
    assert job.info.run_id == created[0] and job.info.status == "FINISHED"
    assert steps(tmp_path, created[0], "val_accuracy") == [0, 1] and job.data.params == {"lr": "0.1"}
    assert t.records.latest(f"job-{JOB}")[1]["run_id"] == created[0]


def _fails_after(created: list, search):
    def flaky(self, *args, **kwargs):
        if created:
            raise ConnectionError("Connection refused")
        return search(self, *args, **kwargs)

    return flaky


def test_a_run_created_by_an_attempt_killed_before_its_record_is_adopted(tmp_path):
    """The server created the job's run (job tags, a first epoch logged), the attempt died before writing the
    run record: the next start adopts that run and logs only the epochs it lacks."""
    t = tracker(tmp_path, "a")
    client = store(tmp_path)
    orphan = client.create_run(t.experiment_id, run_name=JOB, tags={**job_tags(t), "attempt": "1"})
    client.log_metric(orphan.info.run_id, "val_accuracy", 0.3, step=0)
    assert t.records.latest(f"job-{JOB}") == (0, None)
    run = tracker(tmp_path, "b").start_job(JOB, {"lr": 0.1}, {"attempt": 2})
    assert run == orphan.info.run_id
    assert t.records.latest(f"job-{JOB}")[1]["run_id"] == run
    again = tracker(tmp_path, "c")
    for step in range(2):
        again.log_metrics(again.start_job(JOB, {}, {"attempt": 3}) if step == 0 else run, {"val_accuracy": 1.0}, step)
    (job,) = live_runs(tmp_path, "job")
    assert job.data.params == {"lr": "0.1"} and job.data.tags["attempt"] == "3"
    assert [(m.step, m.value) for m in client.get_metric_history(run, "val_accuracy")] == [(0, 0.3), (1, 1.0)]


def test_two_creators_racing_settle_on_the_oldest_run(tmp_path, monkeypatch):
    """Another creator's run of the same ensemble stage lands between this creator's search and its create
    (and starts earlier): this creator deletes its own run and returns the other's."""
    t = tracker(tmp_path, "a")
    create, other = MlflowClient.create_run, []

    def racing(self, experiment_id, run_name=None, tags=None, **kwargs):
        if not other:
            tags_other = {**tags, TOKEN_TAG: "another-creator"}
            started = int(time.time() * 1000) - 1000
            other.append(create(self, experiment_id, run_name=run_name, tags=tags_other, start_time=started))
        return create(self, experiment_id, run_name=run_name, tags=tags, **kwargs)

    monkeypatch.setattr(MlflowClient, "create_run", racing)
    run = t.child_run("voting", {"ensemble.vote_fraction": 0.6}, {"distrain.plan": "abc"})
    monkeypatch.undo()
    assert run == other[0].info.run_id
    assert [r.info.run_id for r in live_runs(tmp_path, "ensemble")] == [run]
    assert store(tmp_path).get_run(run).data.params == {"ensemble.vote_fraction": "0.6"}


def test_the_loser_of_the_record_race_deletes_its_run_and_logs_to_the_recorded_one(tmp_path, monkeypatch):
    """Worker A created and recorded the job's run after worker B's search and before B's record (the store
    showed A's run too late for B): B's record loses, B deletes its own run and reopens A's."""
    a, b = tracker(tmp_path, "a"), tracker(tmp_path, "b")
    record = b.records.create
    winner = []

    def a_first(name, after, content):
        run = store(tmp_path).create_run(a.experiment_id, run_name=JOB, tags=job_tags(a))
        winner.append(run.info.run_id)
        assert a.records.create(name, after, {**content, "run_id": run.info.run_id})
        return record(name, after, content)

    monkeypatch.setattr(b.records, "create", a_first)
    assert b.start_job(JOB, {}, {"attempt": 2}) == winner[0]
    (job,) = live_runs(tmp_path, "job")
    assert job.info.run_id == winner[0] and job.data.tags["attempt"] == "2"


def test_a_study_run_created_before_a_kill_is_found_by_the_next_start(tmp_path, monkeypatch):
    created = lose_the_answer(monkeypatch)
    first = tracker(tmp_path, "a")
    monkeypatch.undo()
    assert first.parent_run_id == created[0] and not first.offline
    assert tracker(tmp_path, "b").parent_run_id == created[0]
    assert [r.info.run_id for r in live_runs(tmp_path, "study")] == created


def test_close_job_runs_deletes_a_running_duplicate_of_a_recorded_job_run(tmp_path):
    """A duplicate left RUNNING (its creator died after creating it, too late for every check) is deleted when the
    study's job runs are closed; the recorded run is ended with the job's status."""
    t = tracker(tmp_path, "a")
    run = t.start_job(JOB, {}, {})
    duplicate = store(tmp_path).create_run(t.experiment_id, run_name=JOB, tags=job_tags(t))
    t.close_job_runs({JOB: "FINISHED"})
    (job,) = live_runs(tmp_path, "job")
    assert job.info.run_id == run and job.info.status == "FINISHED"
    assert store(tmp_path).get_run(duplicate.info.run_id).info.lifecycle_stage == "deleted"


def test_buffered_creates_carry_their_token(tmp_path):
    t = tracker(tmp_path, "a")
    t._go_offline(ConnectionError("down"))
    t.start_job(JOB, {}, {})
    (line,) = [json.loads(x) for x in t.buffer_path.read_text().splitlines() if '"create_run"' in x]
    assert len(line["token"]) == 32 and line["ref"].startswith("local-")
