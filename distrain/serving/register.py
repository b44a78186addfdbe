"""Registration: the study's chosen ensemble written as model files and registered through the tracker, with the
holdout probabilities the served model must reproduce. Independent of which ensembles were built: with stacking
off, the named (or best) voting ensemble is registered all the same."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from distrain.data.index import read_index
from distrain.ensembles.aggregate import Aggregation
from distrain.fsutil import atomic_write
from distrain.serving.artifacts import write_model_artifacts
from distrain.tracking.base import Tracker, model_entry

PYFUNC = "distrain.serving.pyfunc:DistrainPyfunc"
"""The MLflow pyfunc class the registered model is logged with (its import path, resolved when logged)."""


def registered_model_name(agg: Aggregation) -> str:
    """`ensemble.model_name`, else `distrain-<experiment>`."""
    return agg.cfg.ensemble.model_name or f"distrain-{agg.cfg.experiment}"


def register_ensemble(
    agg: Aggregation, tracker: Tracker, run_dir: Path, run_id: str, fence: Callable[[], None]
) -> dict:
    """Write the chosen ensemble's model files into `<run_dir>/ensemble/model/`, log and register them on the MLflow
    run `run_id`, and write `ensemble/model_test.npz` (what the registered model gives on the holdout). Returns
    report.json's `ensemble_model` entry. `fence` raises when the aggregation lost its claim."""
    index = read_index(agg.cfg.data.root)
    artifacts = write_model_artifacts(agg, run_dir / "ensemble" / "model", index.channels, index.classes)
    name, chosen = registered_model_name(agg), agg.registered_ensemble()
    metric = agg.cfg.train.metric
    tags = {"distrain.ensemble": str(chosen), f"cv_{metric}": f"{agg.report.ensembles[chosen]['cv']:.6f}"}
    fence()
    version = tracker.log_ensemble_model(run_id, artifacts, name, PYFUNC, tags)
    probs = agg.registered_test_probs()
    if probs is not None:
        atomic_write(run_dir / "ensemble" / "model_test.npz",
                     lambda f: np.savez(f, sample_ids=np.asarray(agg.store.test_ids), probs=probs))  # fmt: skip
    return {**model_entry(name, version), "ensemble": str(chosen)}
