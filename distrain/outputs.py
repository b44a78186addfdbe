"""What a finished job leaves in `<run_dir>/jobs/<job_id>/`, and how it is read back.

    best.pt        fp32 state dict of the single-device model at its best epoch + job + config
    oof.npz        sample_ids, probs [n, C], labels for the fold's validation samples
    test.npz       the same for the holdout test split (absent if the data set has none)
    metrics.json   per-epoch history
    done.json      written last: the job is finished only if this exists

Every file is written atomically, so a crash leaves either no `done.json` (the job reruns) or a
complete job.
"""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Optional

import numpy as np

from distrain.plan import Job, JobResult, Predictions
from distrain.fsutil import atomic_write, atomic_write_json

DONE = "done.json"


def job_dir(run_dir: Path, job: Job) -> Path:
    return run_dir / "jobs" / job.id


def is_done(run_dir: Path, job: Job) -> bool:
    return (job_dir(run_dir, job) / DONE).is_file()


def _save_predictions(path: Path, pred: Predictions) -> None:
    def write(f):
        buf = io.BytesIO()
        np.savez(buf, sample_ids=np.asarray(pred.sample_ids), probs=pred.probs, labels=pred.labels)
        f.write(buf.getvalue())
    atomic_write(path, write)


def load_predictions(path: Path) -> Predictions:
    with np.load(path, allow_pickle=False) as z:
        return Predictions(sample_ids=[str(s) for s in z["sample_ids"]], probs=z["probs"], labels=z["labels"])


def write_job_outputs(run_dir: Path, result: JobResult, config: dict, mlflow_run_id: str = "") -> Path:
    """Write a finished job's files; `done.json` last. Returns the job directory."""
    d = job_dir(run_dir, result.job)
    job = result.job
    import torch  # late: reading a run directory needs no torch

    atomic_write(d / "best.pt", lambda f: torch.save(
        {"model": result.best_state, "job": {"model": job.model, "seed": job.seed, "fold": job.fold},
         "epoch": result.best_epoch, "val_score": result.val_score, "config": config}, f))
    _save_predictions(d / "oof.npz", result.oof)
    if result.test is not None:
        _save_predictions(d / "test.npz", result.test)
    atomic_write_json(d / "metrics.json", result.history)
    atomic_write_json(d / DONE, {"id": job.id, "model": job.model, "seed": job.seed, "fold": job.fold,
                                 "status": "done", "val_score": result.val_score, "best_epoch": result.best_epoch,
                                 "mlflow_run_id": mlflow_run_id})
    return d


def read_done(run_dir: Path, job: Job) -> dict:
    return json.loads((job_dir(run_dir, job) / DONE).read_text())


def load_job_predictions(run_dir: Path, job: Job) -> tuple[Predictions, Optional[Predictions]]:
    """(OOF, test) predictions of a finished job."""
    d = job_dir(run_dir, job)
    test = d / "test.npz"
    return load_predictions(d / "oof.npz"), (load_predictions(test) if test.exists() else None)
