"""The shape of a finished run directory and of its report.json, to compare runs of different versions."""

from __future__ import annotations

import json
import re
from pathlib import Path


def run_dir_files(run_dir: Path) -> dict[str, int]:
    """Relative paths of the files in a run directory with job, worker and checkpoint names generalised,
    each with how many files share the pattern."""
    counts: dict[str, int] = {}
    for path in sorted(p for p in run_dir.rglob("*") if p.is_file()):
        rel = path.relative_to(run_dir).as_posix()
        rel = re.sub(r"^(ledger/)?jobs/[^/]+/", r"\1jobs/JOB/", rel)
        rel = re.sub(r"^ledger/workers/[^/]+\.json$", "ledger/workers/WORKER.json", rel)
        rel = re.sub(r"checkpoints/[^/]+\.pt$", "checkpoints/JOB.pt", rel)
        rel = re.sub(r"^mlflow/[0-9a-f]+/job-[^/]+-(\d+)\.json$", r"mlflow/STORE/job-JOB-\1.json", rel)
        rel = re.sub(r"^mlflow/[0-9a-f]+/study-(\d+)\.json$", r"mlflow/STORE/study-\1.json", rel)
        counts[rel] = counts.get(rel, 0) + 1
    return counts


def key_tree(value):
    """The nested keys of a JSON value (a list stands for the keys of its first item)."""
    if isinstance(value, dict):
        return {k: key_tree(v) for k, v in sorted(value.items())}
    if isinstance(value, list):
        return [key_tree(value[0])] if value else []
    return type(value).__name__


def layout(run_dir: Path) -> dict:
    return {"files": run_dir_files(run_dir), "report": key_tree(json.loads((run_dir / "report.json").read_text()))}
