"""The tracking interface every tracker implements, the one non-primary ranks get, and small shared pieces.

The tree in MLflow is: experiment (one per experiment name) > study run (one per run directory) > one nested
run per job (whatever its attempts) and per ensemble stage. Which run is whose is recorded in the run
directory (`distrain.tracking.records`), so re-runs, resumed jobs and other workers add to the same runs.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Optional

from distrain.config import check_no_password, check_tracking_uri


def resolve_tracking_uri(configured: str, run_root: str | Path) -> str:
    """config value > $MLFLOW_TRACKING_URI > embedded SQLite store under run_root."""
    if configured:
        return configured
    if os.environ.get("MLFLOW_TRACKING_URI"):
        check_tracking_uri(os.environ["MLFLOW_TRACKING_URI"], "MLFLOW_TRACKING_URI")
        check_no_password(os.environ["MLFLOW_TRACKING_URI"], "MLFLOW_TRACKING_URI")  # report.json would hold it
        return os.environ["MLFLOW_TRACKING_URI"]
    return "sqlite:///" + str((Path(run_root) / "mlflow.db").resolve())


def model_entry(name: str, version: str) -> dict:
    """report.json's `ensemble_model`: the registered model's name, version and models:/ URI."""
    return {"name": name, "version": version, "uri": f"models:/{name}/{version}"}


class Tracker(ABC):
    """What the experiment, the training loop and aggregation log through. Run ids are explicit (no
    global active run); a tracker that cannot reach its server must not raise from these calls."""

    tracking_uri: str = ""
    experiment_id: str = ""
    parent_run_id: str = ""
    """The study run of this run directory."""
    offline: bool = False
    """True while calls are buffered instead of sent (`distrain sync` replays them)."""
    can_register_models: bool = False
    """Whether `log_ensemble_model` registers anything (aggregation skips writing the model files if not)."""

    def go_online(self) -> None:
        """Send calls again (the server is back); `distrain.tracking.buffer.sync_buffers` replays the rest."""
        self.offline = False

    @abstractmethod
    def start_job(self, job_id: str, params: dict, tags: dict) -> str:
        """The job's nested run of the study, one per job whatever its attempts: created on the first start,
        reopened (status RUNNING, this attempt's tags) by later ones; returns its run id."""

    @abstractmethod
    def close_job_runs(self, job_status: dict[str, str]) -> None:
        """End with the given status ({job id: FINISHED | FAILED}) the job runs left RUNNING by dead attempts."""

    @abstractmethod
    def child_run(self, name: str, params: dict, tags: Optional[dict[str, str]] = None) -> str:
        """A nested run of the study named `name` (an ensemble stage) with these tags, reused when aggregation
        runs again with the same name and tags."""

    @abstractmethod
    def log_params(self, run_id: str, params: dict[str, Any]) -> None: ...

    @abstractmethod
    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int) -> None: ...

    @abstractmethod
    def log_artifact(self, run_id: str, path: str | Path, artifact_path: Optional[str] = None) -> None: ...

    @abstractmethod
    def end_run(self, run_id: str, status: str = "FINISHED") -> None: ...

    @abstractmethod
    def log_ensemble_model(
        self,
        run_id: str,
        artifacts_dir: Path,
        registered_name: str,
        python_model: str,
        version_tags: Optional[dict[str, str]] = None,
    ) -> str:
        """Log the ensemble in `artifacts_dir` as a pyfunc model on `run_id`, `python_model` naming its
        `mlflow.pyfunc.PythonModel` class as "package.module:ClassName" (imported when the call executes; the
        class has a `signature()` staticmethod); register it as `registered_name`, give that version the alias
        `champion` and the tags `version_tags`. Returns the version ("pending-sync" offline)."""


class NullTracker(Tracker):
    """What non-primary ranks (and library callers without tracking) get: every call does nothing."""

    def start_job(self, job_id: str, params: dict, tags: dict) -> str:
        return ""

    def close_job_runs(self, job_status: dict[str, str]) -> None:
        pass

    def child_run(self, name: str, params: dict, tags: Optional[dict[str, str]] = None) -> str:
        return ""

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int) -> None:
        pass

    def log_artifact(self, run_id: str, path: str | Path, artifact_path: Optional[str] = None) -> None:
        pass

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        pass

    def log_ensemble_model(
        self,
        run_id: str,
        artifacts_dir: Path,
        registered_name: str,
        python_model: str,
        version_tags: Optional[dict[str, str]] = None,
    ) -> str:
        return ""
