"""The offline spool: tracking calls made while MLflow was unreachable, kept in
`<run_dir>/tracking-buffer/<worker>.jsonl`, and `sync_buffers` (`distrain sync`) that replays them.

Placeholder run ids (`local-...`) stand for runs created offline; replaying maps them to the real
runs, and progress is saved after every call, so an interrupted sync continues where it stopped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from distrain.ensembles.report import model_entry
from distrain.fsutil import atomic_write_json

if TYPE_CHECKING:
    from distrain.tracking.mlflow_tracker import MlflowTracker

PLACEHOLDER = "local-"  # run ids handed out while offline; replaced by real ones at sync
BUFFER_DIR = "tracking-buffer"


def sync_buffers(tracker: MlflowTracker) -> dict:
    """Replay every buffered call of the run directory into MLflow, in order, mapping placeholder run
    ids to the runs they create. Progress is saved after every call, so an interrupted sync continues
    where it stopped. Returns {"synced": n_calls, "files": n_files}. Raises on the first failure."""
    run_dir = tracker.run_dir
    buffer_dir = run_dir / BUFFER_DIR
    state_path = buffer_dir / "sync-state.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {"ids": {}, "done": {}}
    ids, done = state["ids"], state["done"]
    if not tracker.experiment_id:
        tracker.experiment_id = tracker.ensure_experiment()
    marker = run_dir / "mlflow.json"
    saved = read_marker(marker) or {}
    study = saved.get("parent_run_id", "")
    if study.startswith(PLACEHOLDER):
        if study not in ids:
            ids[study] = tracker.client.create_run(
                tracker.experiment_id,
                run_name=f"{saved.get('experiment_name', tracker.experiment_name)}-study",
                tags={"distrain.kind": "study", "distrain.run_dir": str(run_dir.resolve())},
            ).info.run_id
            atomic_write_json(state_path, state)
        atomic_write_json(marker, {**saved, "experiment_id": tracker.experiment_id, "parent_run_id": ids[study]})
    synced = files = 0
    for path in sorted(buffer_dir.glob("*.jsonl")) if buffer_dir.is_dir() else []:
        files += 1
        lines = path.read_text().splitlines()
        for n in range(done.get(path.name, 0), len(lines)):
            if not lines[n].strip():
                continue
            op = json.loads(lines[n])
            if op["op"] == "create_run" and op["kind"] == "study":
                pass  # created above from the marker
            else:
                result = tracker.execute(op, ids)
                if op["op"] == "create_run":
                    ids[op["ref"]] = result
                elif op["op"] == "log_ensemble_model":
                    _record_model_version(run_dir, op["registered_name"], str(result))
            done[path.name] = n + 1
            atomic_write_json(state_path, state)
            synced += 1
    if study.startswith(PLACEHOLDER):
        tracker.parent_run_id = ids[study]
    return {"synced": synced, "files": files}


def _record_model_version(run_dir: Path, name: str, version: str) -> None:
    """Put the version a sync registered into report.json, which said "pending-sync" while offline. The
    buffered upload of report.json comes after this call in the buffer, so MLflow gets the updated file."""
    path = run_dir / "report.json"
    if not path.is_file():
        return
    report = json.loads(path.read_text())
    if report.get("ensemble_model", {}).get("name") == name:
        report["ensemble_model"] = model_entry(name, version)
        atomic_write_json(path, report)


def pending_calls(run_dir: Path) -> int:
    """Buffered tracking calls not yet synced."""
    buffer_dir = run_dir / BUFFER_DIR
    if not buffer_dir.is_dir():
        return 0
    state_path = buffer_dir / "sync-state.json"
    done = json.loads(state_path.read_text())["done"] if state_path.exists() else {}
    return sum(
        max(0, len([ln for ln in p.read_text().splitlines() if ln.strip()]) - done.get(p.name, 0))
        for p in buffer_dir.glob("*.jsonl")
    )


def read_marker(marker: Path) -> Optional[dict]:
    try:
        return json.loads(marker.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
