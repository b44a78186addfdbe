"""Experiment tracking: MLflow on the primary rank, a tracker that does nothing elsewhere.

The tree in MLflow is: experiment (one per experiment name) > study run (one per run directory,
its id kept in `<run_dir>/mlflow.json` so re-runs add to it) > one nested run per job.
The embedded default needs no server: a SQLite store at `<run_root>/mlflow.db` with artifacts
under `<run_root>/mlartifacts`. `tracking.uri` or `$MLFLOW_TRACKING_URI` points it elsewhere.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Optional

from distrain.fsutil import atomic_write_json

PARENT_TAG = "mlflow.parentRunId"  # how MLflow marks a nested run


def resolve_tracking_uri(configured: str, run_root: str | Path) -> str:
    """config value > $MLFLOW_TRACKING_URI > embedded SQLite store under run_root."""
    if configured:
        return configured
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return "sqlite:///" + str((Path(run_root) / "mlflow.db").resolve())


class NullTracker:
    """What non-primary ranks get: every call does nothing."""

    tracking_uri = ""
    experiment_id = ""
    parent_run_id = ""

    def start_job(self, job_id: str, params: dict, tags: dict) -> str:
        return ""

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int) -> None:
        pass

    def child_run(self, name: str, params: dict) -> str:
        return ""

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        pass

    def log_artifact(self, run_id: str, path: str | Path, artifact_path: Optional[str] = None) -> None:
        pass

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        pass


class MlflowTracker(NullTracker):
    """MLflow through `MlflowClient` with explicit run ids (no global active-run state)."""

    def __init__(self, tracking_uri: str, experiment_name: str, run_dir: Path, run_root: Path):
        from mlflow.tracking import MlflowClient

        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.experiment_id = self._experiment(experiment_name, run_root)
        self.parent_run_id = self._study_run(run_dir, experiment_name)

    def _experiment(self, name: str, run_root: Path) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        artifact_location = None
        if self.tracking_uri.startswith("sqlite:"):  # else MLflow would put artifacts under ./mlruns of the cwd
            artifact_location = (run_root / "mlartifacts" / name).resolve().as_uri()
        try:
            return self.client.create_experiment(name, artifact_location=artifact_location)
        except Exception:  # another process created it first
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id

    def _study_run(self, run_dir: Path, name: str) -> str:
        marker = run_dir / "mlflow.json"
        if marker.exists():
            saved = json.loads(marker.read_text())
            if saved.get("tracking_uri") == self.tracking_uri and saved.get("experiment_id") == self.experiment_id:
                try:
                    self.client.get_run(saved["parent_run_id"])
                    self.client.update_run(saved["parent_run_id"], status="RUNNING")
                    return saved["parent_run_id"]
                except Exception:
                    pass  # deleted from the store: start a new study run
        run = self.client.create_run(self.experiment_id, run_name=f"{name}-study",
                                     tags={"distrain.kind": "study", "distrain.run_dir": str(run_dir.resolve())})
        atomic_write_json(marker, {"tracking_uri": self.tracking_uri, "experiment_id": self.experiment_id,
                                   "parent_run_id": run.info.run_id})
        return run.info.run_id

    def start_job(self, job_id: str, params: dict, tags: dict) -> str:
        run = self.client.create_run(self.experiment_id, run_name=job_id,
                                     tags={PARENT_TAG: self.parent_run_id, "distrain.kind": "job",
                                           "distrain.job_id": job_id, **{k: str(v) for k, v in tags.items()}})
        self.log_params(run.info.run_id, params)
        return run.info.run_id

    def child_run(self, name: str, params: dict) -> str:
        """A nested run of the study named `name` (an ensemble stage), reused when aggregation runs again."""
        found = self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{self.parent_run_id}' "
                                                f"and tags.mlflow.runName = '{name}'", max_results=1)
        if found:
            run_id = found[0].info.run_id
            self.client.update_run(run_id, status="RUNNING")
            return run_id
        run = self.client.create_run(self.experiment_id, run_name=name,
                                     tags={PARENT_TAG: self.parent_run_id, "distrain.kind": "ensemble"})
        self.log_params(run.info.run_id, params)
        return run.info.run_id

    def log_ensemble_model(self, run_id: str, artifacts_dir: Path, registered_name: str) -> str:
        """Log the ensemble as a pyfunc model on `run_id`, register it, and return the new version."""
        import mlflow
        import mlflow.pyfunc

        from distrain.serving import DistrainPyfunc

        mlflow.set_tracking_uri(self.tracking_uri)
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(name="ensemble", python_model=DistrainPyfunc(),
                                           artifacts={"ensemble": str(artifacts_dir)},
                                           pip_requirements=["distrain", "torch", "timm", "lightgbm", "pillow"],
                                           registered_model_name=registered_name)
        return str(info.registered_model_version)

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for start in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(run_id, params=items[start:start + 100])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def log_artifact(self, run_id: str, path: str | Path, artifact_path: Optional[str] = None) -> None:
        self.client.log_artifact(run_id, str(path), artifact_path)

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)


def create_tracker(is_primary: bool, tracking_uri: str, experiment_name: str, run_dir: Path,
                   run_root: Path) -> NullTracker:
    """MlflowTracker on the primary rank, NullTracker on the others."""
    if not is_primary:
        return NullTracker()
    return MlflowTracker(tracking_uri, experiment_name, run_dir, run_root)
