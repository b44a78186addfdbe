"""What a finished job leaves in `<run_dir>/jobs/<job_id>/`, and how it is read back.

    best.pt        fp32 state dict of the single-device model at its best epoch + job + config
                   (written by `distrain.training.outputs`, which has torch)
    oof.npz        sample_ids, probs [n, C], labels for the fold's validation samples
    test.npz       the same for the holdout test split (absent if the data set has none)
    metrics.json   per-epoch history
    done.json      written last: the job is finished only if this exists; it holds the sha256 and size of
                   best.pt, oof.npz and test.npz

Every file is written atomically, so a crash leaves either no `done.json` (the job reruns) or a
complete job. Files damaged or lost afterwards (a bad disk, a hand edit) are caught by `job_files_problem`:
sizes on every check, sha256 where the predictions are read.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from distrain.fsutil import atomic_write, atomic_write_json
from distrain.study.plan import Job
from distrain.tasks import Task

DONE = "done.json"


@dataclass
class Predictions:
    """Probabilities keyed by sample id, in a fixed (sorted by id) order."""

    sample_ids: list[str]
    probs: np.ndarray  # [n, num_classes] float32
    labels: np.ndarray  # [n] int64

    def score(self, metric: str, task: Task) -> float:
        return task.score(metric, self.labels, self.probs)


@dataclass
class JobResult:
    """A trained job: its best epoch's score, OOF and test predictions, weights and per-epoch history."""

    job: Job
    val_score: float
    best_epoch: int
    oof: Predictions
    test: Optional[Predictions]
    best_state: dict[str, Any]  # fp32 state dict (torch tensors) of the single-device model at its best epoch
    history: list[dict] = field(default_factory=list)
    best_source: str = "raw"  # "raw" weights or their "ema"


def job_dir(run_dir: Path, job: Job) -> Path:
    return run_dir / "jobs" / job.id


def is_done(run_dir: Path, job: Job) -> bool:
    """done.json exists (the job finished; whether its files are intact is `job_files_problem`'s question)."""
    return (job_dir(run_dir, job) / DONE).is_file()


def file_digest(path: Path) -> dict:
    """{"sha256", "bytes"} of a file, read in 1 MiB blocks."""
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
            size += len(block)
    return {"sha256": h.hexdigest(), "bytes": size}


def job_files_problem(run_dir: Path, job: Job, hashed: tuple[str, ...] = ()) -> Optional[str]:
    """None when the finished job's files are whole; else what is wrong, as a phrase naming the file. Sizes
    are always compared with done.json's record; the files in `hashed` also by sha256."""
    d = job_dir(run_dir, job)
    try:
        done = json.loads((d / DONE).read_text())
    except FileNotFoundError:
        return f"{d / DONE} is missing"
    except (json.JSONDecodeError, UnicodeDecodeError):
        return f"{d / DONE} is not valid JSON"
    if not isinstance(done, dict) or done.get("id") != job.id or not isinstance(done.get("val_score"), (int, float)):
        return f"{d / DONE} does not describe job {job.id}"
    recorded = done.get("files") or {"oof.npz": None}  # done.json of an older version: no digests
    for name, digest in recorded.items():
        path = d / name
        if not path.is_file():
            return f"{path} is missing"
        if digest is None:
            continue
        size = path.stat().st_size
        if size != digest["bytes"]:
            return f"{path} is {size} bytes, done.json says {digest['bytes']} (truncated or replaced)"
        if name in hashed and file_digest(path)["sha256"] != digest["sha256"]:
            return f"{path} does not match its sha256 in done.json (corrupted)"
    return None


def set_aside_job_files(run_dir: Path, job: Job) -> Path:
    """Move a finished job's outputs (those still there) into `jobs/<id>/damaged-<ns>/`; returns that folder."""
    d = job_dir(run_dir, job)
    aside = d / f"damaged-{time.time_ns()}"
    aside.mkdir(parents=True)
    for name in (DONE, "best.pt", "oof.npz", "test.npz", "metrics.json"):
        try:
            os.rename(d / name, aside / name)
        except FileNotFoundError:
            pass  # lost, or set aside by another worker that found the same damage
    return aside


def save_predictions(path: Path, pred: Predictions) -> None:
    def write(f):
        buf = io.BytesIO()
        np.savez(buf, sample_ids=np.asarray(pred.sample_ids), probs=pred.probs, labels=pred.labels)
        f.write(buf.getvalue())

    atomic_write(path, write)


def load_predictions(path: Path) -> Predictions:
    with np.load(path, allow_pickle=False) as z:
        return Predictions(sample_ids=[str(s) for s in z["sample_ids"]], probs=z["probs"], labels=z["labels"])


def write_job_files(run_dir: Path, result: JobResult, mlflow_run_id: str = "") -> Path:
    """Write a finished job's predictions and history, then `done.json` last (so `best.pt` must already be
    there). Returns the job directory."""
    d = job_dir(run_dir, result.job)
    job = result.job
    save_predictions(d / "oof.npz", result.oof)
    if result.test is not None:
        save_predictions(d / "test.npz", result.test)
    atomic_write_json(d / "metrics.json", result.history)
    atomic_write_json(
        d / DONE,
        {
            "id": job.id,
            "model": job.model,
            "seed": job.seed,
            "fold": job.fold,
            "status": "done",
            "val_score": result.val_score,
            "best_epoch": result.best_epoch,
            "best_source": result.best_source,
            "mlflow_run_id": mlflow_run_id,
            "files": {n: file_digest(d / n) for n in ("best.pt", "oof.npz", "test.npz") if (d / n).exists()},
        },
    )
    return d


def read_done(run_dir: Path, job: Job) -> dict:
    return json.loads((job_dir(run_dir, job) / DONE).read_text())


def load_job_predictions(run_dir: Path, job: Job) -> tuple[Predictions, Optional[Predictions]]:
    """(OOF, test) predictions of a finished job."""
    d = job_dir(run_dir, job)
    test = d / "test.npz"
    return load_predictions(d / "oof.npz"), (load_predictions(test) if test.exists() else None)
