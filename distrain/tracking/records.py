"""Which MLflow run is whose: the run directory's study run and each job's run, per tracking store.

    <run_dir>/mlflow/<store key>/study-000001.json           {"run_id", "tracking_uri", "experiment_id", ...}
    <run_dir>/mlflow/<store key>/job-<job id>-000001.json    {"run_id", ...}

A record is never overwritten: each version is created exclusively (a hard link, as the ledger's claims),
and the newest version counts. Of two workers recording the first run of a job or of the study, exactly
one wins and the other adopts the winner's run; a run deleted from the store, or a placeholder replaced
by `distrain sync`, gets the next version. The store key is a hash of the tracking URI, so changing
`tracking.uri` starts a fresh set of records instead of reading another store's run ids.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Optional

from distrain.fsutil import create_exclusive_json, read_json_if_complete

RECORDS_DIR = "mlflow"
STUDY = "study"
_VERSION = re.compile(r"^(?P<name>.+)-(?P<version>\d{6})\.json$")


def store_key(tracking_uri: str) -> str:
    return hashlib.sha256(tracking_uri.encode()).hexdigest()[:16]


def job_record_name(job_id: str) -> str:
    return f"job-{job_id}"


class RunRecords:
    """The records of one run directory for one tracking store."""

    def __init__(self, run_dir: Path, tracking_uri: str):
        self.directory = Path(run_dir) / RECORDS_DIR / store_key(tracking_uri)

    def latest(self, name: str) -> tuple[int, Optional[dict]]:
        """(version, content) of the newest record `name`; (0, None) when there is none."""
        versions = sorted(self._versions(name), reverse=True)
        for version in versions:
            content = read_json_if_complete(self.directory / f"{name}-{version:06d}.json")
            if content is not None:
                return version, content
        return (versions[0] if versions else 0), None

    def create(self, name: str, after: int, content: dict) -> bool:
        """Record `content` as version `after + 1` of `name`; False when another writer created it first."""
        return create_exclusive_json(self.directory / f"{name}-{after + 1:06d}.json", content)

    def all_latest(self) -> dict[str, dict]:
        """Every record name with its newest content."""
        names = {m["name"] for p in self._files() if (m := _VERSION.match(p.name))}
        return {name: content for name in sorted(names) if (content := self.latest(name)[1]) is not None}

    def _files(self) -> list[Path]:
        return list(self.directory.iterdir()) if self.directory.is_dir() else []

    def _versions(self, name: str) -> list[int]:
        out = []
        for p in self._files():
            m = _VERSION.match(p.name)
            if m and m["name"] == name:
                out.append(int(m["version"]))
        return out


def study_record(run_dir: Path, tracking_uri: str) -> Optional[dict]:
    """The run directory's study-run record for this tracking store, if any."""
    return RunRecords(run_dir, tracking_uri).latest(STUDY)[1]
