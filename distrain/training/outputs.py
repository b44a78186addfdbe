"""Writing a finished job's files: `best.pt` (torch) here, then the predictions, history and `done.json`
through `distrain.study.results`, which reads them back without torch."""

from __future__ import annotations

from pathlib import Path

import torch

from distrain.fsutil import atomic_write
from distrain.study.results import JobResult, job_dir, write_job_files


def write_job_outputs(run_dir: Path, result: JobResult, config: dict, mlflow_run_id: str = "") -> Path:
    """Write a finished job's files, `done.json` last. Returns the job directory."""
    job = result.job
    checkpoint = {
        "model": result.best_state,
        "job": {"model": job.model, "seed": job.seed, "fold": job.fold},
        "epoch": result.best_epoch,
        "val_score": result.val_score,
        "config": config,
    }
    atomic_write(job_dir(run_dir, job) / "best.pt", lambda f: torch.save(checkpoint, f))
    return write_job_files(run_dir, result, mlflow_run_id)
