"""Run creation that never leaves two MLflow runs for one thing (the study, a job, an ensemble stage).

A run is found by the tags that identify it before one is created. A create carries a unique token tag, so a
create whose answer was lost (the connection reset after the server committed it, MLflow's HTTP retry sending
it again) is found by that token instead of repeated. Two creators racing (two workers, a sync beside a worker)
settle on the oldest run, by (start time, run id). Where a run record (`distrain.tracking.records`) names the
run for good (the study's, a job's), the record decides instead, and each creator deletes its runs that the
record does not name; an ensemble stage's creators delete their runs that are not the oldest.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

PARENT_TAG = "mlflow.parentRunId"  # how MLflow marks a nested run
RUN_NAME_TAG = "mlflow.runName"
TOKEN_TAG = "distrain.create_token"


def new_token() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True)
class RunSpec:
    """The run to find or create: `identity`, the tags that make it the same run; `tags`, all it gets."""

    experiment_id: str
    name: str
    identity: dict[str, str]
    tags: dict[str, str]
    token: str


@dataclass(frozen=True)
class FoundRun:
    run_id: str
    created: bool
    """Created by this call (its token), rather than one that existed already."""
    params: dict[str, str]
    """The params the run holds (a creator that died before logging them left none)."""
    mine: tuple[str, ...] = ()
    """Every run this call created (its token) and did not delete: `run_id` if `created`, and duplicates."""


def find_or_create(client: Any, spec: RunSpec, settle: bool = True) -> FoundRun:
    """The run `spec` identifies: the oldest existing one, else one created now. Raises when the server cannot
    say whether the run exists (the caller buffers the call; replaying it comes here again).

    `settle`: delete this call's runs that are not the oldest at once. A run another process found meanwhile
    may be one of them, so where a run record decides between creators (the study's, a job's) the caller
    passes False and deletes `mine` but the recorded run once the record is written."""
    existing = search(client, spec.experiment_id, spec.identity)
    if existing:
        return _found(existing[0], spec.token, ())
    try:
        client.create_run(spec.experiment_id, run_name=spec.name, tags={**spec.tags, TOKEN_TAG: spec.token})
    except Exception:
        if not search(client, spec.experiment_id, {TOKEN_TAG: spec.token}):  # committed, its answer lost?
            raise
    runs = search(client, spec.experiment_id, spec.identity)  # ours, and any another creator made meanwhile
    if not runs:
        raise ConnectionError(f"MLflow did not show the run {spec.name!r} it created")
    mine = [r.info.run_id for r in runs if r.data.tags.get(TOKEN_TAG) == spec.token]  # twice: a retried request
    if settle:
        for duplicate in mine:
            if duplicate != runs[0].info.run_id:
                client.delete_run(duplicate)
        mine = [run_id for run_id in mine if run_id == runs[0].info.run_id]
    return _found(runs[0], spec.token, tuple(mine))


def _found(run: Any, token: str, mine: tuple[str, ...]) -> FoundRun:
    return FoundRun(run.info.run_id, run.data.tags.get(TOKEN_TAG) == token, dict(run.data.params), mine)


def search(client: Any, experiment_id: str, tags: dict[str, str]) -> list:
    """The experiment's live runs carrying all these tags, oldest first (start time, then run id: an order
    every creator agrees on)."""
    runs = client.search_runs(
        [experiment_id],
        filter_string=" and ".join(f"tags.`{key}` = '{quoted(value)}'" for key, value in tags.items()),
        order_by=["attributes.start_time ASC"],
        max_results=200,
    )
    return sorted(runs, key=lambda r: (r.info.start_time or 0, r.info.run_id))


def quoted(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\'")
