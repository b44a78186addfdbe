"""Rules for the URLs a config names (tracking.uri, sweep.storage, $MLFLOW_TRACKING_URI): a scheme MLflow can
store runs in, and no password (a config is copied into the run directory and MLflow, where anyone reading the
study would see it). Kept here rather than in `tracking/` because `load_config` applies them before any work."""

from __future__ import annotations

import os
import re

from distrain.errors import ConfigError

TRACKING_SCHEMES = ("http", "https", "sqlite", "postgresql", "mysql", "mssql", "databricks", "databricks-uc")


_URL_PASSWORD = re.compile(r"^[\w+.-]+://[^:/@]*:[^@]+@|[?&](password|passwd)=", re.IGNORECASE)  # as SQLAlchemy reads


def check_no_password(url: str, key: str) -> None:
    """Refuse a URL that carries a password (`user:pw@`, or a `password=` query): a config is copied into the run
    directory, into MLflow's artifacts and every job run's params, where anyone reading the study would see it."""
    if _URL_PASSWORD.search(url):
        raise ConfigError(f"{key}: the URL holds a password, which would be saved in config.yaml and MLflow; leave "
                          f"it out and give it through the environment (PostgreSQL: PGPASSWORD or ~/.pgpass; an "
                          f"MLflow server: MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD)")  # fmt: skip


def check_tracking_uri(uri: str, where: str) -> None:
    """Refuse, before any work, a tracking URI MLflow cannot store runs in (`where` names the key or variable)."""
    scheme = uri.partition("://")[0].split("+")[0].lower() if "://" in uri else ""
    if scheme in TRACKING_SCHEMES:
        return
    if scheme in ("", "file") and os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() in ("1", "true"):
        return
    if scheme in ("", "file"):
        raise ConfigError(f"{where}={uri!r}: MLflow 3 refuses its file store for new runs; use sqlite:///<path>/mlflow.db"
                          f" (or set MLFLOW_ALLOW_FILE_STORE=true)")  # fmt: skip
    raise ConfigError(f"{where}={uri!r}: MLflow has no store for scheme {scheme!r} (use one of "
                      f"{', '.join(TRACKING_SCHEMES)})")  # fmt: skip
