"""The ensemble's registered model, MLflow 3 style: logged to an explicit run (no fluent active run, the process's
tracking URI left as it was), its class named by import path, the version aliased `champion` and tagged; the same
on a re-run of the same aggregation and on a sync of a buffered call."""

import os

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from distrain.tracking.buffer import sync_buffers
from distrain.tracking.mlflow_tracker import MlflowTracker

ECHO = """
import mlflow.pyfunc


class Echo(mlflow.pyfunc.PythonModel):
    @staticmethod
    def signature():
        from mlflow.models import ModelSignature
        from mlflow.types import ParamSchema, ParamSpec

        return ModelSignature(inputs=None, params=ParamSchema([ParamSpec("output", "string", "probabilities")]))

    def predict(self, context, model_input, params=None):
        return model_input
"""
TAGS = {"distrain.ensemble": "soft_vote", "cv_accuracy": "0.9876"}


@pytest.fixture
def echo_model(tmp_path, monkeypatch) -> str:
    (tmp_path / "echo_model.py").write_text(ECHO)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "echo_model:Echo"


def tracker(tmp_path, worker: str) -> MlflowTracker:
    (tmp_path / "runs" / "x").mkdir(parents=True, exist_ok=True)
    return MlflowTracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "x", tmp_path / "runs" / "x", tmp_path / "runs",
                         worker=worker)  # fmt: skip


def artifacts(tmp_path):
    (tmp_path / "model").mkdir(exist_ok=True)
    (tmp_path / "model" / "meta.json").write_text("{}")
    return tmp_path / "model"


def test_registered_version_gets_the_champion_alias_and_its_tags_idempotently(tmp_path, echo_model):
    before = (mlflow.get_tracking_uri(), os.environ.get("MLFLOW_TRACKING_URI"))
    t = tracker(tmp_path, "a")
    stacking = t.child_run("stacking", {}, {})
    version = t.log_ensemble_model(stacking, artifacts(tmp_path), "distrain-x", echo_model, TAGS)
    assert mlflow.active_run() is None and (mlflow.get_tracking_uri(), os.environ.get("MLFLOW_TRACKING_URI")) == before
    client = MlflowClient(t.tracking_uri)
    champion = client.get_model_version_by_alias("distrain-x", "champion")
    assert str(champion.version) == version == "1" and champion.run_id == stacking
    assert {k: champion.tags[k] for k in TAGS} == TAGS
    (logged,) = client.search_logged_models([t.experiment_id])  # in the run's experiment, not the default one
    assert logged.source_run_id == stacking

    again = tracker(tmp_path, "b")  # aggregation run again: the stage's run and its version are reused
    assert again.child_run("stacking", {}, {}) == stacking
    client.delete_registered_model_alias("distrain-x", "champion")
    assert again.log_ensemble_model(stacking, artifacts(tmp_path), "distrain-x", echo_model, TAGS) == "1"
    assert str(client.get_model_version_by_alias("distrain-x", "champion").version) == "1"
    assert len(client.search_model_versions("name='distrain-x'")) == 1

    grown = again.child_run("stacking", {"ensemble.max_rounds": 20}, {})  # other settings: a new run and version
    assert again.log_ensemble_model(grown, artifacts(tmp_path), "distrain-x", echo_model, TAGS) == "2"
    assert str(client.get_model_version_by_alias("distrain-x", "champion").version) == "2"


def test_a_buffered_model_call_names_its_class_and_sync_registers_aliases_and_tags_it(tmp_path, echo_model):
    t = tracker(tmp_path, "a")
    stacking = t.child_run("stacking", {}, {})
    t._go_offline(ConnectionError("down"))
    assert t.log_ensemble_model(stacking, artifacts(tmp_path), "distrain-x", echo_model, TAGS) == "pending-sync"
    assert '"python_model": "echo_model:Echo"' in t.buffer_path.read_text()
    sync_buffers(tracker(tmp_path, "sync"))
    champion = MlflowClient(t.tracking_uri).get_model_version_by_alias("distrain-x", "champion")
    assert str(champion.version) == "1" and {k: champion.tags[k] for k in TAGS} == TAGS


def test_a_python_model_path_that_does_not_import_is_the_callers_one_line_error(tmp_path):
    t = tracker(tmp_path, "a")
    with pytest.raises(ValueError, match=r"^python_model 'nowhere:Model': cannot import it \(ModuleNotFoundError"):
        t.log_ensemble_model("r", artifacts(tmp_path), "distrain-x", "nowhere:Model")
    with pytest.raises(ValueError, match="expected 'package.module:ClassName'"):
        t.log_ensemble_model("r", artifacts(tmp_path), "distrain-x", "os.path")
    assert not t.offline


def test_a_registration_sent_twice_keeps_one_version(tmp_path, echo_model, monkeypatch):
    """MLflow's HTTP retry of a create whose answer was lost registers the run's model twice: the later version
    is deleted and the first one aliased."""
    create = MlflowClient._create_model_version

    def twice(self, *args, **kwargs):
        create(self, *args, **kwargs)
        return create(self, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "_create_model_version", twice)
    t = tracker(tmp_path, "a")
    assert t.log_ensemble_model(t.child_run("stacking", {}, {}), artifacts(tmp_path), "distrain-x", echo_model) == "1"
    monkeypatch.undo()
    client = MlflowClient(t.tracking_uri)
    assert [str(v.version) for v in client.search_model_versions("name='distrain-x'")] == ["1"]
    assert str(client.get_model_version_by_alias("distrain-x", "champion").version) == "1"
