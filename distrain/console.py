"""What people see: distrain's own lines, progress bars on a terminal, plain lines in a log, and library
noise (MLflow's pickling and type-hint notices, artifact-download bars, third-party warnings) sent to
`<run_dir>/distrain.log` instead of the terminal."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

LOG_NAME = "distrain.log"
_PACKAGE_DIR = str(Path(__file__).resolve().parent)
_HANDLERS: dict[Path, logging.FileHandler] = {}
_NOISY_LOGGERS = ("mlflow", "alembic", "urllib3", "git", "matplotlib", "lightgbm", "DeepSpeed", "py.warnings")


def is_terminal() -> bool:
    """stderr is a terminal: progress bars redraw there; in a log file they would be carriage-return soup."""
    return sys.stderr.isatty()


def loggers_to_log(run_dir: Path, names: tuple[str, ...]) -> logging.Handler:
    """Send these loggers' records to `<run_dir>/distrain.log` only. A library that configures its logger when
    imported (MLflow does) needs this again after its import."""
    path = (run_dir / LOG_NAME).resolve()
    handler = _HANDLERS.get(path)
    if handler is None:  # one open file per log, however often loggers are (re)routed to it
        run_dir.mkdir(parents=True, exist_ok=True)
        handler = _HANDLERS[path] = logging.FileHandler(path)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    for name in names:
        logger = logging.getLogger(name)
        logger.handlers = [handler]
        logger.propagate = False
    return handler


def route_library_output(run_dir: Path) -> Path:
    """Send library log records and warnings raised outside distrain to `<run_dir>/distrain.log` (distrain's
    own warnings still reach stderr). Call once the run directory exists; returns the log's path."""
    path = run_dir / LOG_NAME
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    handler = loggers_to_log(run_dir, _NOISY_LOGGERS)
    to_terminal = warnings.showwarning

    def showwarning(message, category, filename, lineno, file=None, line=None):
        if str(filename).startswith(_PACKAGE_DIR):
            to_terminal(message, category, filename, lineno, file, line)
        else:
            handler.stream.write(warnings.formatwarning(message, category, filename, lineno, line))
            handler.flush()

    warnings.showwarning = showwarning
    return path


@contextlib.contextmanager
def library_prints_to_log(run_dir: Path) -> Iterator[None]:
    """Lines a library prints itself (MLflow's "Successfully registered model ...") go to the run's log."""
    with open(run_dir / LOG_NAME, "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        yield
