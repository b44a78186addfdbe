"""The MLflow client of one tracker with its HTTP retries and timeout bounded per call, without changing them
for the rest of the process.

MLflow 3 has no per-client setting for these: `mlflow.utils.rest_utils.http_request` reads
MLFLOW_HTTP_REQUEST_MAX_RETRIES / _BACKOFF_FACTOR / _TIMEOUT from the environment on every request (its
defaults, 7 retries with backoff 2 and a 120 s timeout, block for minutes on a dead server). So each call sets
them and restores what was there before, under one lock so that two threads never interleave a save and a
restore.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from distrain.fsutil import exclusive_lock

_ENV_LOCK = threading.RLock()
_TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"


def http_settings(timeout_s: float, max_retries: int) -> dict[str, str]:
    return {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(max_retries),
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(max(1, int(round(timeout_s)))),
    }


@contextlib.contextmanager
def scoped_environ(values: dict[str, str | None]) -> Iterator[None]:
    """Environment variables set (None: removed) for the body only; the previous values are put back."""
    with _ENV_LOCK:
        saved = {key: os.environ.get(key) for key in values}
        try:
            _apply(values)
            yield
        finally:
            _apply(saved)


def _apply(values: dict[str, str | None]) -> None:
    for key, value in values.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


class BoundedClient:
    """An `MlflowClient` whose every method call runs with this tracker's HTTP bounds (`bounded()`)."""

    def __init__(self, client: Any, timeout_s: float, max_retries: int):
        self.unbounded = client
        self.settings: dict[str, str | None] = dict(http_settings(timeout_s, max_retries))

    def bounded(self) -> contextlib.AbstractContextManager:
        """The bounds for calls MLflow makes through clients of its own (model logging, system metrics)."""
        return scoped_environ(self.settings)

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self.unbounded, name)
        if not callable(attribute):
            return attribute

        @functools.wraps(attribute)
        def call(*args, **kwargs):
            with self.bounded():
                return attribute(*args, **kwargs)

        return call


@contextlib.contextmanager
def process_tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's model logging, logged-model finalising and registration take no client: they read the
    process-wide tracking URI. It is set for the body and restored afterwards, with $MLFLOW_TRACKING_URI,
    which `mlflow.set_tracking_uri` also writes (and removes when restoring an unset URI)."""
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    with _ENV_LOCK:
        saved = os.environ.get(_TRACKING_URI_ENV)
        try:
            with _use_tracking_uri(uri):
                yield
        finally:
            _apply({_TRACKING_URI_ENV: saved})


def sqlite_schema_lock(tracking_uri: str) -> contextlib.AbstractContextManager:
    """Workers starting together on one SQLite store would each create MLflow's tables ("table experiments
    already exists"); a file lock beside the database lets the first create them and the rest reuse them."""
    if not tracking_uri.startswith("sqlite:///"):
        return contextlib.nullcontext()
    return exclusive_lock(Path(tracking_uri[len("sqlite:///") :] + ".lock"))
