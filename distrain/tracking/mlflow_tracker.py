"""MLflow on the primary rank, through `MlflowClient` with explicit run ids, never stalling training.

See `distrain.tracking.base` for the tree it builds and `distrain.tracking.buffer` for what happens to
calls made while the server is unreachable.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Optional

from distrain.console import library_prints_to_log, loggers_to_log
from distrain.errors import StorageError
from distrain.fsutil import exclusive_lock
from distrain.tracking.base import Tracker
from distrain.tracking.buffer import BUFFER_DIR, PLACEHOLDER
from distrain.tracking.records import STUDY, RunRecords, job_record_name

PARENT_TAG = "mlflow.parentRunId"  # how MLflow marks a nested run


class MlflowTracker(Tracker):
    """MLflow through `MlflowClient` with explicit run ids (no global active-run state).

    A tracking server that is down never stalls training: HTTP retries and timeouts are bounded
    (tracking.max_retries / timeout_s), and after the first failed call the tracker goes offline for
    the rest of the process: it warns once, hands out placeholder run ids (`local-...`) and appends
    every call to `<run_dir>/tracking-buffer/<worker>.jsonl`. `sync_buffers` (`distrain sync`) replays
    the buffers later through the same code path, so the MLflow tree ends as if nothing was lost.
    """

    def __init__(
        self,
        tracking_uri: str,
        experiment_name: str,
        run_dir: Path,
        run_root: Path,
        *,
        timeout_s: float = 10.0,
        max_retries: int = 1,
        worker: str = "",
    ):
        from mlflow.tracking import MlflowClient

        loggers_to_log(run_dir, ("mlflow", "alembic"))  # MLflow set its own stderr handler when imported
        bound_http_requests(timeout_s, max_retries)
        self.tracking_uri = tracking_uri
        self.run_dir, self.run_root, self.experiment_name = run_dir, run_root, experiment_name
        safe_worker = re.sub(r"[^A-Za-z0-9_.-]", "_", worker or f"{socket.gethostname()}-{os.getpid()}")
        self.buffer_path = run_dir / BUFFER_DIR / f"{safe_worker}.jsonl"
        self.offline = False
        self.experiment_id = ""
        with _sqlite_schema_lock(tracking_uri):
            try:
                self.client = MlflowClient(tracking_uri=tracking_uri)  # a SQLite store is created / migrated here
            except Exception as e:  # a local store that cannot be written: no server to wait for
                if not tracking_uri.startswith("sqlite:"):
                    raise
                first = (str(e).strip().splitlines() or [""])[0][:200]
                raise StorageError(f"cannot write the MLflow store {tracking_uri} ({first}); free space or set "
                                   f"tracking.uri") from None  # fmt: skip
            try:
                self.experiment_id = self.ensure_experiment()
            except Exception as e:
                self._go_offline(e)
        self.records = RunRecords(run_dir, tracking_uri)
        self._logged_steps: dict[str, dict[str, int]] = {}  # per reopened run: metric -> last step in the store
        self._replay_dedupe: set[str] = set()  # sync: job runs reopened by a later attempt (`begin_replay`)
        self._held: dict[str, set[tuple[str, int]]] = {}  # sync: (metric, step) each of those runs holds
        self._study_marked_running = False
        self.parent_run_id = self._study_run()

    can_register_models = True

    # ---- offline handling ----------------------------------------------------------------------
    def _go_offline(self, error: BaseException) -> None:
        if not self.offline:
            self.offline = True
            print(
                f"distrain: warning: MLflow at {self.tracking_uri} failed ({type(error).__name__}: "
                f"{str(error).splitlines()[0][:200] if str(error) else ''}); training goes on, tracking is "
                f"buffered in {self.buffer_path.parent} until `distrain sync --run-dir {self.run_dir}`",
                file=sys.stderr,
                flush=True,
            )

    def _submit(self, op: dict) -> Any:
        """Execute one tracking call now, or buffer it when offline (or when it fails)."""
        if not self.offline and not _refers_to_placeholder(op):
            try:
                return self.execute(op, {})
            except Exception as e:
                self._go_offline(e)
        if op["op"] == "create_run":
            op = {**op, "ref": f"{PLACEHOLDER}{uuid.uuid4().hex}"}
        self.buffer_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.buffer_path, "a") as f:
            f.write(json.dumps(op) + "\n")
            f.flush()
            os.fsync(f.fileno())
        return op.get("ref", "pending-sync" if op["op"] == "log_ensemble_model" else None)

    def _terminate(self, run_id: str, status: str) -> None:
        """End a run; MLflow prints two "View run / experiment at" lines per run it ends: to the run's log."""
        with library_prints_to_log(self.run_dir):
            self.client.set_terminated(run_id, status=status)

    def execute(self, op: dict, ids: dict[str, str]) -> Any:
        """Perform one (possibly replayed) call; `ids` maps placeholder ids to real ones."""
        run = ids.get(op.get("run", ""), op.get("run", ""))
        kind = op["op"]
        if kind == "create_run":
            parent = ids.get(op["parent"], op["parent"])
            if op["kind"] == "ensemble":
                same_tags = "".join(f" and tags.`{k}` = '{v}'" for k, v in op["tags"].items())
                found = self.client.search_runs(
                    [self.experiment_id],
                    filter_string=f"tags.mlflow.parentRunId = '{parent}' and tags.mlflow.runName = '{op['name']}'"
                    + same_tags,
                    max_results=1,
                )
                if found:  # the same stage of the same plan and settings: its new rows show its latest scores
                    self.client.update_run(found[0].info.run_id, status="RUNNING")
                    return found[0].info.run_id
            created = self.client.create_run(
                self.experiment_id, run_name=op["name"], tags={PARENT_TAG: parent, **op["tags"]}
            )
            self._log_params_now(created.info.run_id, op["params"])
            return created.info.run_id
        if kind == "log_params":
            return self._log_params_now(run, op["params"])
        if kind == "log_metrics":
            from mlflow.entities import Metric

            metrics = [Metric(k, v, op["timestamp"], op["step"]) for k, v in op["metrics"].items()]
            if run in self._replay_dedupe:  # replayed by sync: no (metric, step) a job's run holds goes twice
                held = self._held.get(run)
                if held is None:  # read once per sync: what earlier attempts (or an interrupted sync) sent
                    held = self._held[run] = self._held_pairs(run)
                metrics = [m for m in metrics if (m.key, m.step) not in held]
                held.update((m.key, m.step) for m in metrics)
            if metrics:
                self.client.log_batch(run, metrics=metrics)
        elif kind == "log_artifact":
            self.client.log_artifact(run, op["path"], op["artifact_path"])
        elif kind == "end_run":
            self._terminate(run, op["status"])
        elif kind == "reopen_run":
            self.client.update_run(run, status="RUNNING")
            for key, value in op["tags"].items():
                self.client.set_tag(run, key, value)
        elif kind == "log_ensemble_model":
            return self._log_ensemble_model_now(run, Path(op["artifacts_dir"]), op["registered_name"])
        else:
            raise ValueError(f"unknown tracking operation {kind!r}")
        return None

    # ---- setup ---------------------------------------------------------------------------------
    def ensure_experiment(self) -> str:
        """The experiment's id, creating the experiment if needed (another process may win that race)."""
        name, run_root = self.experiment_name, self.run_root
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

    def _study_run(self) -> str:
        """The run directory's study run in this store: the recorded one while it exists, else one found by
        its `distrain.run_dir` tag (a lost record), else a new one. The record is created exclusively, so of
        several workers starting together one run wins and the others adopt it (never a recursion)."""
        version, saved = self.records.latest(STUDY)
        if saved is not None and self._study_usable(saved["run_id"]):
            return saved["run_id"]
        run_id, created = self.find_or_create_study()
        content = {
            "run_id": run_id,
            "tracking_uri": self.tracking_uri,
            "experiment_id": self.experiment_id,
            "experiment_name": self.experiment_name,
        }
        if self.records.create(STUDY, version, content):
            return run_id
        winner = self.records.latest(STUDY)[1] or content  # another worker recorded its study run first
        if created and not run_id.startswith(PLACEHOLDER) and winner["run_id"] != run_id:
            self.client.delete_run(run_id)
        if winner["run_id"].startswith(PLACEHOLDER):
            self._study_unsynced()
        return winner["run_id"]

    def _study_usable(self, run_id: str) -> bool:
        """Whether the recorded study run can be logged to (a placeholder means: buffer until synced)."""
        if run_id.startswith(PLACEHOLDER):
            self._study_unsynced()
            return True
        if self.offline:
            return True
        try:
            return self.client.get_run(run_id).info.lifecycle_stage != "deleted"
        except Exception as e:
            if _is_missing_run(e):
                return False
            self._go_offline(e)
            return True

    def _study_unsynced(self) -> None:
        if not self.offline:
            self.offline = True
            print(
                f"distrain: MLflow study run not synced yet: tracking is buffered until "
                f"`distrain sync --run-dir {self.run_dir}`",
                file=sys.stderr,
                flush=True,
            )

    def find_or_create_study(self) -> tuple[str, bool]:
        """(run id, created by this call): the store's study run of this run directory, or a new one."""
        tags = {"distrain.kind": "study", "distrain.run_dir": str(self.run_dir.resolve())}
        if not self.offline:
            try:
                found = self.client.search_runs(
                    [self.experiment_id],
                    filter_string=" and ".join(f"tags.`{k}` = '{_quoted(v)}'" for k, v in tags.items()),
                    order_by=["attributes.start_time ASC"],
                    max_results=1,
                )
                if found:
                    return found[0].info.run_id, False
                name = f"{self.experiment_name}-study"
                return self.client.create_run(self.experiment_id, run_name=name, tags=tags).info.run_id, True
            except Exception as e:
                self._go_offline(e)
        return f"{PLACEHOLDER}{uuid.uuid4().hex}", True

    # ---- the tracker interface -----------------------------------------------------------------
    def start_job(self, job_id: str, params: dict, tags: dict) -> str:
        """The job's one run: created and recorded on its first start, reopened by every later attempt (which
        then logs only the metric steps the run does not hold yet)."""
        self._mark_study_running()
        tags = {k: str(v) for k, v in tags.items()}
        name = job_record_name(job_id)
        version, saved = self.records.latest(name)
        if saved is not None and self._reopen(saved["run_id"], tags):
            return saved["run_id"]
        run_id = self._submit(
            {
                "op": "create_run",
                "kind": "job",
                "name": job_id,
                "parent": self.parent_run_id,
                "tags": {"distrain.kind": "job", "distrain.job_id": job_id, **tags},
                "params": {k: str(v)[:6000] for k, v in params.items()},
            }
        )
        if self.records.create(name, version, {"run_id": run_id, "job_id": job_id, "tracking_uri": self.tracking_uri}):
            return run_id
        self.end_run(run_id, "KILLED")  # a stale attempt recorded a run first; that one stays the job's run
        winner = self.records.latest(name)[1]
        return winner["run_id"] if winner and self._reopen(winner["run_id"], tags) else run_id

    def _reopen(self, run_id: str, tags: dict[str, str]) -> bool:
        """Mark the job's recorded run RUNNING again with this attempt's tags; False if the store lost it."""
        op = {"op": "reopen_run", "run": run_id, "tags": tags, "dedupe": True}  # sync: see begin_replay
        if self.offline or run_id.startswith(PLACEHOLDER):
            self._submit(op)
            return True
        try:
            run = self.client.get_run(run_id)
            if run.info.lifecycle_stage == "deleted":
                return False
            self.execute(op, {})
            self._logged_steps[run_id] = {key: max(steps) for key, steps in self._history(run_id).items()}
            return True
        except Exception as e:
            if _is_missing_run(e):
                return False
            self._go_offline(e)
            self._submit(op)
            return True

    def _history(self, run_id: str) -> dict[str, list[int]]:
        """metric -> the steps the store holds for it in this run."""
        run = self.client.get_run(run_id)
        return {key: [m.step for m in self.client.get_metric_history(run_id, key)] for key in run.data.metrics}

    def _held_pairs(self, run_id: str) -> set[tuple[str, int]]:
        return {(key, step) for key, steps in self._history(run_id).items() for step in steps}

    def begin_replay(self, reopened: set[str]) -> None:
        """Sync is about to replay buffered calls: the job runs in `reopened` (real ids) were reopened by a later
        attempt, so their rows may repeat steps an earlier attempt logged, in whichever order the buffer files
        come, or may have been sent by a sync that was interrupted. Each (metric, step) is sent to them once."""
        self._replay_dedupe, self._held = set(reopened), {}

    def _mark_study_running(self) -> None:
        """The study run is RUNNING while jobs train (the aggregation ends it); opening a tracker alone, as a
        rerun with nothing to do does, leaves its status alone."""
        if not self._study_marked_running:
            self._study_marked_running = True
            self._submit({"op": "reopen_run", "run": self.parent_run_id, "tags": {}})

    def close_job_runs(self, job_status: dict[str, str]) -> None:
        """End the runs still RUNNING of jobs that are over ({job id: FINISHED | FAILED}): an attempt that
        died without closing its run leaves it RUNNING."""
        if self.offline:
            return  # the buffered calls of the dead attempts are replayed as they were
        try:
            running = self.client.search_runs(
                [self.experiment_id],
                filter_string=f"tags.mlflow.parentRunId = '{self.parent_run_id}' and attributes.status = 'RUNNING'",
                max_results=5000,
            )
            for run in running:
                status = job_status.get(run.data.tags.get("distrain.job_id", ""))
                if status and run.data.tags.get("distrain.kind") == "job":
                    self._terminate(run.info.run_id, status)
        except Exception as e:
            self._go_offline(e)

    def child_run(self, name: str, params: dict, tags: Optional[dict[str, str]] = None) -> str:
        """A nested run of the study named `name` (an ensemble stage) with these tags, reused when aggregation
        runs again with the same name, tags and params (MLflow keeps a run's first params: other ensemble
        settings get a run of their own)."""
        params = {k: str(v)[:6000] for k, v in params.items()}
        digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]
        return self._submit(
            {
                "op": "create_run",
                "kind": "ensemble",
                "name": name,
                "parent": self.parent_run_id,
                "tags": {"distrain.kind": "ensemble", **(tags or {}), "distrain.params": digest},
                "params": params,
            }
        )

    def log_ensemble_model(
        self, run_id: str, artifacts_dir: Path, registered_name: str, python_model: str = "", version_tags=None
    ) -> str:
        """Log the ensemble as a pyfunc model on `run_id`, register it, and return the new version
        ("pending-sync" when offline)."""
        return str(
            self._submit(
                {
                    "op": "log_ensemble_model",
                    "run": run_id,
                    "artifacts_dir": str(artifacts_dir),
                    "registered_name": registered_name,
                }
            )
        )

    def _log_ensemble_model_now(self, run_id: str, artifacts_dir: Path, registered_name: str) -> str:
        import mlflow

        from distrain.tracking.mlflow_model import DistrainPyfunc, signature  # mlflow.pyfunc without its notice

        for version in self.client.search_model_versions(f"run_id = '{run_id}'"):
            if version.name == registered_name:
                return str(version.version)  # registered by an aggregation attempt that died before finishing
        mlflow.set_tracking_uri(self.tracking_uri)
        with library_prints_to_log(self.run_dir), mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name="ensemble",
                python_model=DistrainPyfunc(),
                signature=signature(),
                artifacts={"ensemble": str(artifacts_dir)},
                pip_requirements=["distrain", "torch", "timm", "lightgbm", "pillow"],
                registered_model_name=registered_name,
            )
        return str(info.registered_model_version)

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        self._submit({"op": "log_params", "run": run_id, "params": {k: str(v)[:6000] for k, v in params.items()}})

    def _log_params_now(self, run_id: str, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in params.items()]
        for start in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(run_id, params=items[start : start + 100])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int) -> None:
        logged = self._logged_steps.get(run_id, {})
        metrics = {k: v for k, v in metrics.items() if step > logged.get(k, -1)}  # a resumed attempt's repeats
        if not metrics:
            return
        self._submit(
            {
                "op": "log_metrics",
                "run": run_id,
                "step": int(step),
                "timestamp": int(time.time() * 1000),
                "metrics": {k: float(v) for k, v in metrics.items()},
            }
        )

    def log_artifact(self, run_id: str, path: str | Path, artifact_path: Optional[str] = None) -> None:
        self._submit(
            {"op": "log_artifact", "run": run_id, "path": str(Path(path).resolve()), "artifact_path": artifact_path}
        )

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self._submit({"op": "end_run", "run": run_id, "status": status})


def bound_http_requests(timeout_s: float, max_retries: int) -> None:
    """MLflow reads these per request; its defaults (7 retries, backoff 2, 120 s timeout) block for minutes."""
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = str(max_retries)
    os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] = "1"
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(max(1, int(round(timeout_s))))


def _sqlite_schema_lock(tracking_uri: str) -> contextlib.AbstractContextManager:
    """Workers starting together on one SQLite store would each create MLflow's tables ("table experiments
    already exists"); a file lock beside the database lets the first create them and the rest reuse them."""
    if not tracking_uri.startswith("sqlite:///"):
        return contextlib.nullcontext()
    return exclusive_lock(Path(tracking_uri[len("sqlite:///") :] + ".lock"))


def _refers_to_placeholder(op: dict) -> bool:
    return any(str(op.get(k, "")).startswith(PLACEHOLDER) for k in ("run", "parent"))


def _quoted(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\'")


def _is_missing_run(error: Exception) -> bool:
    return "RESOURCE_DOES_NOT_EXIST" in str(getattr(error, "error_code", "")) or "not found" in str(error).lower()
