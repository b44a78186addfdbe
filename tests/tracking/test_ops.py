"""The tracking calls as typed values whose buffer lines keep the format older distrain versions wrote: such a
buffer still replays."""

import json

import pytest
from mlflow.tracking import MlflowClient

from distrain.tracking.buffer import sync_buffers
from distrain.tracking.mlflow_tracker import MlflowTracker
from distrain.tracking.ops import PYFUNC_DEFAULT, CreateRun, LogEnsembleModel, LogMetrics, ReopenRun, op_from_json

# Lines as distrain wrote them before the calls were typed (one of each kind, in its key order).
TODAYS_LINES = [
    '{"op": "create_run", "kind": "job", "name": "m-s1-f0", "parent": "local-s", "tags": {"distrain.kind": "job", '
    '"distrain.job_id": "m-s1-f0", "attempt": "1"}, "params": {"lr": "0.1"}, "ref": "local-j"}',
    '{"op": "log_params", "run": "local-j", "params": {"batch_size": "32"}}',
    '{"op": "log_metrics", "run": "local-j", "step": 0, "timestamp": 1700000000000, "metrics": {"val_accuracy": 0.5}}',
    '{"op": "log_artifact", "run": "local-j", "path": "/runs/x/config.yaml", "artifact_path": null}',
    '{"op": "end_run", "run": "local-j", "status": "FINISHED"}',
    '{"op": "reopen_run", "run": "local-s", "tags": {}}',
    '{"op": "reopen_run", "run": "local-j", "tags": {"attempt": "2"}, "dedupe": true}',
]
TODAYS_MODEL_LINE = '{"op": "log_ensemble_model", "run": "r", "artifacts_dir": "/a", "registered_name": "distrain-x"}'


@pytest.mark.parametrize("line", TODAYS_LINES)
def test_a_line_in_todays_format_reads_back_and_writes_out_the_same(line):
    assert json.dumps(op_from_json(json.loads(line)).to_json()) == line


def test_fields_added_since_get_their_defaults_and_are_written():
    op = op_from_json(json.loads(TODAYS_MODEL_LINE))
    assert op == LogEnsembleModel("r", "/a", "distrain-x", PYFUNC_DEFAULT, {})
    assert op.to_json() == {**json.loads(TODAYS_MODEL_LINE), "python_model": PYFUNC_DEFAULT, "version_tags": {}}
    created = CreateRun("job", "j", "p", {}, {}, token="t0", ref="local-r")
    assert list(created.to_json()) == ["op", "kind", "name", "parent", "tags", "params", "token", "ref"]
    assert op_from_json(created.to_json()) == created
    assert ReopenRun("r", {}).to_json() == {"op": "reopen_run", "run": "r", "tags": {}}


def test_an_unknown_operation_is_one_line():
    with pytest.raises(ValueError, match="^unknown tracking operation 'log_figure' in the tracking buffer$"):
        op_from_json({"op": "log_figure", "run": "r"})


def test_a_buffer_written_in_todays_format_replays(tmp_path):
    """An older distrain's buffer (no create tokens) of a job created offline, under a study run created online."""
    run_dir = tmp_path / "runs" / "x"
    run_dir.mkdir(parents=True)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    study = MlflowTracker(uri, "x", run_dir, tmp_path / "runs", worker="w").parent_run_id
    lines = [ln.replace("local-s", study) for ln in TODAYS_LINES if "/runs/x/config.yaml" not in ln]
    lines.insert(3, LogMetrics("local-j", 1, 1700000001000, {"val_accuracy": 0.7}).to_json())
    (run_dir / "tracking-buffer").mkdir()
    (run_dir / "tracking-buffer" / "old.jsonl").write_text(
        "\n".join(ln if isinstance(ln, str) else json.dumps(ln) for ln in lines) + "\n"
    )
    assert sync_buffers(MlflowTracker(uri, "x", run_dir, tmp_path / "runs", worker="sync")) == {
        "synced": 6,
        "files": 1,
    }  # and 1 creation
    client = MlflowClient(uri)
    (job,) = [r for r in client.search_runs([client.get_experiment_by_name("x").experiment_id])
              if r.data.tags.get("distrain.kind") == "job"]  # fmt: skip
    assert job.data.tags["mlflow.parentRunId"] == study and job.data.tags["attempt"] == "2"
    assert job.data.params == {"lr": "0.1", "batch_size": "32"} and job.info.status == "RUNNING"  # reopened last
    assert [(m.step, m.value) for m in client.get_metric_history(job.info.run_id, "val_accuracy")] == [
        (0, 0.5),
        (1, 0.7),
    ]
