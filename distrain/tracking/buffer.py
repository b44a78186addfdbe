"""The offline spool: tracking calls made while MLflow was unreachable, kept in
`<run_dir>/tracking-buffer/<worker>.jsonl`, and `sync_buffers` (`distrain sync`) that replays them.

Placeholder run ids (`local-...`) stand for runs created offline; replaying maps them to the real
runs, and progress is saved after every call, so an interrupted sync continues where it stopped.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional, Protocol

from distrain import interrupts
from distrain.errors import Preempted
from distrain.fsutil import atomic_write_json, atomic_write_text, exclusive_lock
from distrain.tracking.base import model_entry
from distrain.tracking.ops import CreateRun, LogEnsembleModel, Op, ReopenRun, op_from_json
from distrain.tracking.records import STUDY, RunRecords

PLACEHOLDER = "local-"  # run ids handed out while offline; replaced by real ones at sync
BUFFER_DIR = "tracking-buffer"


class Replayer(Protocol):
    """What a sync needs of a tracker (`MlflowTracker` is one): the store it sends to and the calls it replays."""

    run_dir: Path
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    records: RunRecords

    def ensure_experiment(self) -> str: ...

    def find_or_create_study(self) -> tuple[str, bool]: ...

    def begin_replay(self, dedupe: set[str]) -> None: ...

    def execute(self, op: Op, ids: dict[str, str]) -> Any: ...


def sync_buffers(tracker: Replayer, wait: bool = True) -> Optional[dict]:
    """Replay every buffered call of the run directory into MLflow, mapping placeholder run ids to the runs
    they create: first every run creation (a worker's buffer may log to a run another worker's buffer
    created), then every other call in order. One sync at a time per run directory (a lock: `wait` False
    returns None when another sync holds it). Progress is saved after every call, so an interrupted sync
    continues where it stopped; each call is tried a few times (a flaky connection). Afterwards the run
    records and report.json name the real runs. Returns {"synced": n_calls, "files": n_files}."""
    buffer_dir = tracker.run_dir / BUFFER_DIR
    buffer_dir.mkdir(parents=True, exist_ok=True)
    waiting = f"distrain: another sync of {tracker.run_dir} is running; waiting for it"
    with exclusive_lock(buffer_dir / "sync.lock", wait, waiting) as held:
        if not held:
            return None
        state_path = buffer_dir / "sync-state.json"
        state = json.loads(state_path.read_text()) if state_path.exists() else {}
        state = {"ids": {}, "created": {}, "done": {}, **state}
        if not tracker.experiment_id:
            tracker.experiment_id = tracker.ensure_experiment()
        study = _map_study_placeholder(tracker, state["ids"])
        atomic_write_json(state_path, state)
        files = sorted(buffer_dir.glob("*.jsonl"))
        for path in files:
            _replay(tracker, path, state, state_path, creations=True)
        _record_real_runs(tracker, state["ids"])
        _replace_in_report(tracker.run_dir / "report.json", state["ids"])
        tracker.begin_replay(_job_runs(files, state["ids"]))
        synced = sum(_replay(tracker, path, state, state_path, creations=False) for path in files)
        if study.startswith(PLACEHOLDER):
            tracker.parent_run_id = state["ids"][study]
        return {"synced": synced, "files": len(files)}


def _replay(tracker: Replayer, path: Path, state: dict, state_path: Path, creations: bool) -> int:
    """One pass over one buffer file from where the last sync stopped: its run creations, or its other calls."""
    progress = state["created" if creations else "done"]
    lines = path.read_text().splitlines()
    calls = 0
    for n in range(progress.get(path.name, 0), len(lines)):
        if interrupts.stop_requested():  # SIGTERM: every call so far is recorded as sent
            raise Preempted(f"sync of {tracker.run_dir} stopped by SIGTERM with its progress saved; run "
                            f"`distrain sync --run-dir {tracker.run_dir}` again to continue")  # fmt: skip
        op = op_from_json(json.loads(lines[n])) if lines[n].strip() else None
        is_creation = isinstance(op, CreateRun)
        if op is not None and is_creation == creations and not (is_creation and op.ref in state["ids"]):
            result = _with_retries(lambda op=op: tracker.execute(op, state["ids"]))
            if isinstance(op, CreateRun):
                state["ids"][op.ref] = result
            elif isinstance(op, LogEnsembleModel):
                _record_model_version(tracker.run_dir, op.registered_name, str(result))
            calls += 1
        progress[path.name] = n + 1
        atomic_write_json(state_path, state)
    return calls


def _job_runs(files: list[Path], ids: dict[str, str]) -> set[str]:
    """The real ids of the job runs the buffers create or reopen: rows sent to them are checked against the store
    (a buffered create may have found a run that an earlier attempt had logged to)."""
    runs = set()
    for path in files:
        for line in path.read_text().splitlines():
            op = op_from_json(json.loads(line)) if line.strip() else None
            if isinstance(op, ReopenRun) and op.dedupe:
                runs.add(ids.get(op.run, op.run))
            elif isinstance(op, CreateRun) and op.kind == "job" and op.ref in ids:
                runs.add(ids[op.ref])
    return runs


def _with_retries(call, attempts: int = 4, first_wait_s: float = 0.5):
    """A call through a connection that drops now and then: tried again after 0.5, 1, 2 s."""
    for attempt in range(attempts):
        try:
            return call()
        except Exception:
            if attempt == attempts - 1:
                raise
            time.sleep(first_wait_s * 2**attempt)


def _map_study_placeholder(tracker: Replayer, ids: dict[str, str]) -> str:
    """The study run id the records name; a placeholder (the study run was created offline) gets a real run."""
    saved = tracker.records.latest(STUDY)[1] or {}
    study = saved.get("run_id", "")
    if study.startswith(PLACEHOLDER) and study not in ids:
        real, _ = tracker.find_or_create_study()
        if real.startswith(PLACEHOLDER):
            raise ConnectionError(f"MLflow at {tracker.tracking_uri} did not answer")
        ids[study] = real
    return study


def _record_real_runs(tracker: Replayer, ids: dict[str, str]) -> None:
    """New versions of the run records that name placeholders, naming the real runs, so later attempts and
    workers log to them directly."""
    records = tracker.records
    for name, content in records.all_latest().items():
        if content["run_id"] in ids:
            records.create(name, records.latest(name)[0], {**content, "run_id": ids[content["run_id"]]})


def _replace_in_report(path: Path, ids: dict[str, str]) -> None:
    """report.json written offline names placeholder run ids (the study run's); name the real runs."""
    if not path.is_file():
        return
    text = path.read_text()
    replaced = text
    for placeholder, real in ids.items():
        replaced = replaced.replace(f'"{placeholder}"', f'"{real}"')
    if replaced != text:
        atomic_write_text(path, replaced)


def _record_model_version(run_dir: Path, name: str, version: str) -> None:
    """Put the version a sync registered into report.json, which said "pending-sync" while offline. The
    buffered upload of report.json comes after this call in the buffer, so MLflow gets the updated file."""
    path = run_dir / "report.json"
    if not path.is_file():
        return
    report = json.loads(path.read_text())
    if report.get("ensemble_model", {}).get("name") == name:
        report["ensemble_model"] = {**report["ensemble_model"], **model_entry(name, version)}  # keeps "ensemble"
        atomic_write_json(path, report)


def pending_calls(run_dir: Path) -> int:
    """Buffered tracking calls not yet synced."""
    buffer_dir = run_dir / BUFFER_DIR
    if not buffer_dir.is_dir():
        return 0
    state_path = buffer_dir / "sync-state.json"
    done = json.loads(state_path.read_text()).get("done", {}) if state_path.exists() else {}
    return sum(
        max(0, len([ln for ln in p.read_text().splitlines() if ln.strip()]) - done.get(p.name, 0))
        for p in buffer_dir.glob("*.jsonl")
    )
