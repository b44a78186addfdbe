"""MLflow on the primary rank, through `MlflowClient` with explicit run ids, never stalling training.

See `distrain.tracking.base` for the tree it builds, `distrain.tracking.runs` for how a run is created once
whatever fails, `distrain.tracking.ops` for the calls, and `distrain.tracking.buffer` for what happens to calls
made while the server is unreachable.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from distrain.console import library_prints_to_log, loggers_to_log
from distrain.errors import StorageError
from distrain.tracking.base import Tracker, resolve_tracking_uri
from distrain.tracking.buffer import BUFFER_DIR, PLACEHOLDER
from distrain.tracking.client import BoundedClient, sqlite_schema_lock
from distrain.tracking.ops import (
    CreateRun,
    DeleteRun,
    EndRun,
    LogArtifact,
    LogEnsembleModel,
    LogMetrics,
    LogParams,
    Op,
    ReopenRun,
)
from distrain.tracking.records import STUDY, RunRecords, job_record_name
from distrain.tracking.registry import register_ensemble, resolve_python_model
from distrain.tracking.runs import PARENT_TAG, RUN_NAME_TAG, FoundRun, RunSpec, find_or_create, new_token
from distrain.tracking.system_metrics import start_monitor, stop_monitor

if TYPE_CHECKING:
    from distrain.config import TrackingConfig

JOB_IDENTITY = ("distrain.kind", "distrain.job_id")  # with the parent run: which job a run is


class MlflowTracker(Tracker):
    """MLflow through `MlflowClient` with explicit run ids (no global active-run state).

    A tracking server that is down never stalls training: HTTP retries and timeouts are bounded
    (tracking.max_retries / timeout_s), and after the first failed call the tracker goes offline for
    the rest of the process: it warns once, hands out placeholder run ids (`local-...`) and appends
    every call to `<run_dir>/tracking-buffer/<worker>.jsonl`. `sync_buffers` (`distrain sync`) replays
    the buffers later through the same code path, so the MLflow tree ends as if nothing was lost.
    """

    can_register_models = True
    system_metrics_interval_s: float = 10.0
    """Seconds between two system-metric samples (MLflow's default; $MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL
    overrides it)."""

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
        system_metrics: bool = False,
    ):
        import mlflow  # noqa: F401  (first: importing MLflow sets its own stderr handler, which the next line replaces)

        loggers_to_log(run_dir, ("mlflow", "alembic"))
        self.tracking_uri, self.timeout_s, self.system_metrics = tracking_uri, timeout_s, system_metrics
        self.run_dir, self.run_root, self.experiment_name = run_dir, run_root, experiment_name
        safe_worker = re.sub(r"[^A-Za-z0-9_.-]", "_", worker or f"{socket.gethostname()}-{os.getpid()}")
        self.buffer_path = run_dir / BUFFER_DIR / f"{safe_worker}.jsonl"
        self.offline = False
        self.experiment_id = ""
        with sqlite_schema_lock(tracking_uri):
            self.client = _open_client(tracking_uri, timeout_s, max_retries)
            try:
                self.experiment_id = self.ensure_experiment()
            except Exception as e:
                self._go_offline(e)
        self.records = RunRecords(run_dir, tracking_uri)
        self._logged_steps: dict[str, dict[str, int]] = {}  # per reopened run: metric -> last step in the store
        self._replay_dedupe: set[str] = set()  # sync: job runs whose rows are checked (`begin_replay`)
        self._held: dict[str, set[tuple[str, int]]] = {}  # sync: (metric, step) each of those runs holds
        self._adopted: set[str] = set()  # runs a create found existing instead of making
        self._mine: dict[str, tuple[str, ...]] = {}  # run a create returned -> the runs it created
        self._monitors: dict[str, Any] = {}  # job run -> its system-metrics monitor
        self._study_marked_running = False
        self.parent_run_id = self._study_run()

    @classmethod
    def from_config(cls, tc: TrackingConfig, run_dir: Path, experiment: str, worker: str = "") -> MlflowTracker:
        """The tracker of `run_dir`'s study run as the `tracking` config section says (the default store sits
        beside run directories; the experiment is `tc.experiment_name`, else `experiment`)."""
        return cls(
            resolve_tracking_uri(tc.uri, run_dir.parent),
            tc.experiment_name or experiment,
            run_dir,
            run_dir.parent,
            timeout_s=tc.timeout_s,
            max_retries=tc.max_retries,
            worker=worker,
            system_metrics=tc.system_metrics,
        )

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

    def _submit(self, op: Op) -> Any:
        """Execute one tracking call now, or buffer it when offline (or when it fails)."""
        if not self.offline and not any(run.startswith(PLACEHOLDER) for run in op.run_ids()):
            for attempt in range(2):
                try:
                    if isinstance(op, CreateRun):  # a job's duplicates wait for its run record to decide
                        return self._create_run(op, {}, settle=op.kind != "job")
                    return self.execute(op, {})
                except Exception as e:
                    if attempt == 1 or not _passing(e):
                        self._go_offline(e)
                        break
                time.sleep(1.0)  # every call is idempotent, a create included (found by its token)
        if isinstance(op, CreateRun):
            op = dataclasses.replace(op, ref=f"{PLACEHOLDER}{uuid.uuid4().hex}")
        self.buffer_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.buffer_path, "a") as f:
            f.write(json.dumps(op.to_json()) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if isinstance(op, CreateRun):
            return op.ref
        return "pending-sync" if isinstance(op, LogEnsembleModel) else None

    def _terminate(self, run_id: str, status: str) -> None:
        """End a run; MLflow prints two "View run / experiment at" lines per run it ends: to the run's log."""
        with library_prints_to_log(self.run_dir):
            self.client.set_terminated(run_id, status=status)

    def execute(self, op: Op, ids: dict[str, str]) -> Any:
        """Perform one (possibly replayed) call; `ids` maps placeholder ids to real ones."""
        run = ids.get(getattr(op, "run", ""), getattr(op, "run", ""))
        match op:
            case CreateRun():
                return self._create_run(op, ids)
            case LogParams():
                self._log_params_now(run, op.params)
            case LogMetrics():
                self._log_metrics_now(run, op)
            case LogArtifact():
                self.client.log_artifact(run, op.path, op.artifact_path)
            case EndRun():
                self._terminate(run, op.status)
            case ReopenRun():
                self.client.update_run(run, status="RUNNING")
                for key, value in op.tags.items():
                    self.client.set_tag(run, key, value)
            case DeleteRun():
                self.client.delete_run(run)
            case LogEnsembleModel():
                return self._log_ensemble_model_now(run, op)
            case _:
                raise ValueError(f"unknown tracking operation {type(op).__name__}")
        return None

    def _create_run(self, op: CreateRun, ids: dict[str, str], settle: bool = True) -> str:
        """The run `op` stands for: found by its identifying tags if it exists (an attempt killed before
        recording it, a create whose answer was lost, another creator's), else created once. A replayed create
        that finds its run leaves the run's status to the calls that follow it in the buffer. `settle`: see
        `runs.find_or_create`; unsettled runs of this call are kept in `_mine` for the caller."""
        parent = ids.get(op.parent, op.parent)
        if op.kind == "job":
            identity = {PARENT_TAG: parent, **{key: op.tags[key] for key in JOB_IDENTITY}}
        else:  # an ensemble stage: the same stage of the same plan and settings
            identity = {PARENT_TAG: parent, RUN_NAME_TAG: op.name, **op.tags}
        tags = {PARENT_TAG: parent, **op.tags}
        spec = RunSpec(self.experiment_id, op.name, identity, tags, op.token or new_token())
        found = find_or_create(self.client, spec, settle)
        if not settle:
            self._mine[found.run_id] = found.mine
        missing = {key: value for key, value in op.params.items() if key not in found.params}
        if missing:  # a new run, or one whose creator died before logging them
            self._log_params_now(found.run_id, missing)
        if not found.created:
            self._adopted.add(found.run_id)
        return found.run_id

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
        found = self._find_or_create_study(settle=False)
        run_id = found.run_id
        content = {
            "run_id": run_id,
            "tracking_uri": self.tracking_uri,
            "experiment_id": self.experiment_id,
            "experiment_name": self.experiment_name,
        }
        recorded = content
        if not self.records.create(STUDY, version, content):
            recorded = self.records.latest(STUDY)[1] or content  # another worker recorded its study run first
        for mine in found.mine:
            if mine != recorded["run_id"]:
                self._discard(mine)
        if recorded["run_id"].startswith(PLACEHOLDER):
            self._study_unsynced()
        return recorded["run_id"]

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
        found = self._find_or_create_study(settle=True)
        return found.run_id, found.created

    def _find_or_create_study(self, settle: bool) -> FoundRun:
        tags = {"distrain.kind": "study", "distrain.run_dir": str(self.run_dir.resolve())}
        if not self.offline:
            try:
                spec = RunSpec(self.experiment_id, f"{self.experiment_name}-study", tags, tags, new_token())
                return find_or_create(self.client, spec, settle)
            except Exception as e:
                self._go_offline(e)
        return FoundRun(f"{PLACEHOLDER}{uuid.uuid4().hex}", True, {})

    def _discard(self, run_id: str) -> None:
        """Drop a run this process created that the run record does not name: nobody logs to it (a process that
        found it records it, loses, and takes the recorded one). A placeholder needs nothing: its buffered
        create finds the recorded run when it is replayed."""
        if not run_id.startswith(PLACEHOLDER):
            self._submit(DeleteRun(run_id))

    # ---- the tracker interface -----------------------------------------------------------------
    def start_job(self, job_id: str, params: dict, tags: dict) -> str:
        """The job's one run: created and recorded on its first start, reopened by every later attempt (which
        then logs only the metric steps the run does not hold yet)."""
        self._mark_study_running()
        self._stop_monitors()  # one job at a time: a job given up on a lost lease samples no more
        tags = {k: str(v) for k, v in tags.items()}
        version, saved = self.records.latest(job_record_name(job_id))
        if saved is not None and self._reopen(saved["run_id"], tags):
            run_id = saved["run_id"]
        else:
            run_id = self._create_job_run(job_id, params, tags, version)
        self._start_monitor(run_id)
        return run_id

    def _create_job_run(self, job_id: str, params: dict, tags: dict[str, str], version: int) -> str:
        """The job's run when no record names a live one: found (an attempt killed before recording it left
        it, or a create's answer was lost) or created, then recorded; a stale attempt that recorded a run first
        keeps it the job's run."""
        op = CreateRun(
            kind="job",
            name=job_id,
            parent=self.parent_run_id,
            tags={"distrain.kind": "job", "distrain.job_id": job_id, **tags},
            params={k: str(v)[:6000] for k, v in params.items()},
            token=new_token(),
        )
        run_id = self._submit(op)
        if run_id in self._adopted:
            self._reopen(run_id, tags)  # RUNNING, this attempt's tags, and the metric steps it holds
        name, recorded = job_record_name(job_id), run_id
        content = {"run_id": run_id, "job_id": job_id, "tracking_uri": self.tracking_uri}
        if not self.records.create(name, version, content):
            winner = self.records.latest(name)[1]
            if winner is not None and winner["run_id"] != run_id and self._reopen(winner["run_id"], tags):
                recorded = winner["run_id"]
        for mine in self._mine.pop(run_id, ()):
            if mine != recorded:
                self._discard(mine)
        return recorded

    def _reopen(self, run_id: str, tags: dict[str, str]) -> bool:
        """Mark the job's recorded run RUNNING again with this attempt's tags; False if the store lost it."""
        op = ReopenRun(run_id, tags, dedupe=True)  # sync: see begin_replay
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

    def begin_replay(self, dedupe: set[str]) -> None:
        """Sync is about to replay buffered calls: the job runs in `dedupe` (real ids) may get rows that repeat
        steps an earlier attempt logged, in whichever order the buffer files come, or that a sync which was
        interrupted sent already. Each (metric, step) is sent to them once."""
        self._replay_dedupe, self._held = set(dedupe), {}

    def _mark_study_running(self) -> None:
        """The study run is RUNNING while jobs train (the aggregation ends it); opening a tracker alone, as a
        rerun with nothing to do does, leaves its status alone."""
        if not self._study_marked_running:
            self._study_marked_running = True
            self._submit(ReopenRun(self.parent_run_id, {}))

    def _start_monitor(self, run_id: str) -> None:
        """System metrics on the job's run (tracking.system_metrics); none while offline: they are not buffered."""
        if not self.system_metrics or self.offline or run_id.startswith(PLACEHOLDER):
            return
        try:
            with self.client.bounded():
                monitor = start_monitor(run_id, self.tracking_uri, self.system_metrics_interval_s)
        except Exception:  # a nicety: training goes on without it
            return
        if monitor is not None:
            self._monitors[run_id] = monitor

    def _stop_monitors(self, run_id: Optional[str] = None) -> None:
        for rid in [run_id] if run_id is not None else list(self._monitors):
            monitor = self._monitors.pop(rid, None)
            if monitor is not None:
                stop_monitor(monitor, self.timeout_s)

    def close_job_runs(self, job_status: dict[str, str]) -> None:
        """End the runs still RUNNING of jobs that are over ({job id: FINISHED | FAILED}): an attempt that
        died without closing its run leaves it RUNNING. A RUNNING run of such a job that is not its recorded
        run is a duplicate whose creator died before finding the recorded one: deleted."""
        if self.offline:
            return  # the buffered calls of the dead attempts are replayed as they were
        try:
            running = self.client.search_runs(
                [self.experiment_id],
                filter_string=f"tags.mlflow.parentRunId = '{self.parent_run_id}' and attributes.status = 'RUNNING'",
                max_results=5000,
            )
            for run in running:
                job_id = run.data.tags.get("distrain.job_id", "")
                if run.data.tags.get("distrain.kind") != "job" or not job_status.get(job_id):
                    continue
                recorded = (self.records.latest(job_record_name(job_id))[1] or {}).get("run_id", run.info.run_id)
                if recorded != run.info.run_id and not recorded.startswith(PLACEHOLDER):
                    self.client.delete_run(run.info.run_id)
                else:
                    self._terminate(run.info.run_id, job_status[job_id])
        except Exception as e:
            self._go_offline(e)

    def child_run(self, name: str, params: dict, tags: Optional[dict[str, str]] = None) -> str:
        """A nested run of the study named `name` (an ensemble stage) with these tags, reused when aggregation
        runs again with the same name, tags and params (MLflow keeps a run's first params: other ensemble
        settings get a run of their own)."""
        params = {k: str(v)[:6000] for k, v in params.items()}
        digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]
        op = CreateRun(
            kind="ensemble",
            name=name,
            parent=self.parent_run_id,
            tags={"distrain.kind": "ensemble", **(tags or {}), "distrain.params": digest},
            params=params,
            token=new_token(),
        )
        run_id = self._submit(op)
        if run_id in self._adopted:  # the same stage of the same plan and settings: its new rows show its latest scores
            self._submit(ReopenRun(run_id, {}))
        return run_id

    def log_ensemble_model(
        self,
        run_id: str,
        artifacts_dir: Path,
        registered_name: str,
        python_model: str,
        version_tags: Optional[dict[str, str]] = None,
    ) -> str:
        """Log the ensemble as a pyfunc model of class `python_model` ("package.module:ClassName") on `run_id`,
        register it, alias the version `champion`, tag it with `version_tags`; returns the version
        ("pending-sync" when offline)."""
        resolve_python_model(python_model)  # a wrong path is the caller's error, not a tracking failure to buffer
        tags = {k: str(v) for k, v in (version_tags or {}).items()}
        return str(self._submit(LogEnsembleModel(run_id, str(artifacts_dir), registered_name, python_model, tags)))

    def _log_ensemble_model_now(self, run_id: str, op: LogEnsembleModel) -> str:
        with library_prints_to_log(self.run_dir):
            return register_ensemble(self.client, self.experiment_id, self.tracking_uri, run_id, op)

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        self._submit(LogParams(run_id, {k: str(v)[:6000] for k, v in params.items()}))

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
        metrics = {k: float(v) for k, v in metrics.items()}
        self._submit(LogMetrics(run_id, int(step), int(time.time() * 1000), metrics))

    def _log_metrics_now(self, run_id: str, op: LogMetrics) -> None:
        from mlflow.entities import Metric

        metrics = [Metric(k, v, op.timestamp, op.step) for k, v in op.metrics.items()]
        if run_id in self._replay_dedupe:  # replayed by sync: no (metric, step) a job's run holds goes twice
            held = self._held.get(run_id)
            if held is None:  # read once per sync: what earlier attempts (or an interrupted sync) sent
                held = self._held[run_id] = self._held_pairs(run_id)
            metrics = [m for m in metrics if (m.key, m.step) not in held]
            held.update((m.key, m.step) for m in metrics)
        if metrics:
            self.client.log_batch(run_id, metrics=metrics)

    def log_artifact(self, run_id: str, path: str | Path, artifact_path: Optional[str] = None) -> None:
        self._submit(LogArtifact(run_id, str(Path(path).resolve()), artifact_path))

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self._stop_monitors(run_id)
        self._submit(EndRun(run_id, status))


def _open_client(tracking_uri: str, timeout_s: float, max_retries: int) -> BoundedClient:
    """The store's client; a SQLite store is created / migrated here."""
    from mlflow.tracking import MlflowClient

    try:
        return BoundedClient(MlflowClient(tracking_uri=tracking_uri), timeout_s, max_retries)
    except Exception as e:  # a local store that cannot be written: no server to wait for
        if not tracking_uri.startswith("sqlite:"):
            raise
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise StorageError(f"cannot write the MLflow store {tracking_uri} ({first}); free space or set "
                           f"tracking.uri") from None  # fmt: skip


def _passing(error: Exception) -> bool:
    """An error worth one more try before going offline for the rest of the process: a reset connection or a
    server error (a busy store), not a server that is down or does not answer in time (no stall)."""
    text = f"{type(error).__name__}: {error}".lower()
    return not any(sign in text for sign in ("refused", "timed out", "timeout", "resolve", "name or service"))


def _is_missing_run(error: Exception) -> bool:
    """The run is gone: never created, or deleted (MLflow refuses changes to a deleted run as not active)."""
    text = str(error).lower()
    return (
        "RESOURCE_DOES_NOT_EXIST" in str(getattr(error, "error_code", ""))
        or "not found" in text
        or "must be in the 'active' state" in text
    )
