"""The files of the registered ensemble (the layout `distrain.serving.predictor` documents and loads)."""

from __future__ import annotations

import functools
import json
import shutil
from dataclasses import asdict
from pathlib import Path

from distrain.config import Config
from distrain.config.lookups import is_factory_name
from distrain.data.transforms import resolve_transform
from distrain.ensembles.aggregate import Aggregation, column_weights
from distrain.names import Ensemble
from distrain.study.plan import Job, column_key
from distrain.tasks import get_task
from distrain.training.models import create_model, model_settings, on_meta


def job_entry(trained: Config, model: str, job_id: str, column: str, checkpoint: str, channels: int,
              num_classes: int) -> dict:  # fmt: skip
    """meta.json's entry of one served network: its checkpoint, preprocessing and TTA as `trained` (its run
    directory's config) trained it, and what rebuilds it (a pair task's head, a factory's arguments)."""
    trained = trained.for_model(model)
    task, head = get_task(trained.task), trained.model.head_settings()
    entry = {"id": job_id, "model": model, "column": column, "checkpoint": checkpoint}
    network = None
    if task.images_per_sample > 1:  # a pair task's network: the siamese head it trained with, if any
        entry["comparison"] = list(head.comparison)
    if is_factory_name(model):  # rebuilt by importing the factory where served, with the arguments it trained with
        entry["model_args"] = model_settings(trained.model, model)
        make = functools.partial(create_model, model, **entry["model_args"])
        network = on_meta(functools.partial(task.build_model, make, num_classes, channels, head))
    entry["transform"] = resolve_transform(model, trained.data, channels, network).to_dict()
    return {**entry, "tta": asdict(trained.tta)}


def write_model_artifacts(agg: Aggregation, dest: Path, channels: int, classes: list[str] | None = None) -> Path:
    """The files EnsemblePredictor loads: checkpoints, meta-learner, meta.json. Each job's checkpoint and
    preprocessing come from its own run directory and config (`store.jobs[i]["source"]`)."""
    cfg, sources, store, outcome = agg.cfg, agg.sources, agg.store, agg.outcome
    if dest.exists():
        shutil.rmtree(dest)
    (dest / "checkpoints").mkdir(parents=True)
    jobs = []
    for j in store.jobs:
        src = sources[j["source"]]
        model, job_id = j["model"][len(src.prefix) :], j["id"][len(src.prefix) :]  # the names it was trained under
        checkpoint = f"{j['id']}.pt"  # a prefixed job: checkpoints/<run dir name>/<job>.pt
        (dest / "checkpoints" / checkpoint).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src.run_dir / "jobs" / job_id / "best.pt", dest / "checkpoints" / checkpoint)
        column = column_key(j["model"], j["seed"])
        jobs.append(job_entry(src.cfg, model, j["id"], column, checkpoint, channels, store.num_classes))
    name = agg.registered_ensemble()
    # every other choice than stacking is a weighted mean of the columns
    method = Ensemble.STACKING if name == Ensemble.STACKING else Ensemble.WEIGHTED_VOTE
    boosters = []  # kept whichever ensemble is registered: meta.json's method says whether they are used
    if outcome.stacking is not None:
        for k, text in enumerate(outcome.stacking.booster_texts):
            (dest / f"booster_{k}.txt").write_text(text)
            boosters.append(f"booster_{k}.txt")
    (dest / "meta.json").write_text(
        json.dumps(
            {
                "columns": store.columns,
                "jobs": jobs,
                "image_size": cfg.data.image_size,
                "channels": channels,
                "num_classes": store.num_classes,
                "task": cfg.task,
                "ensemble": name,
                "method": method,
                "boosters": boosters,
                "weights": column_weights(name, store.columns, outcome),
                # the task's thresholds tuned on the ensemble's OOF (one on p(positive), or one per label), if any
                "threshold": outcome.thresholds[name]["threshold"] if name in outcome.thresholds else None,
                "classes": classes or [str(c) for c in range(store.num_classes)],
            }
        )
    )
    return dest


def write_single_model_artifacts(trained: Config, job: Job, run_dir: Path, dest: Path, classes: list[str],
                                 channels: int, threshold=None) -> Path:  # fmt: skip
    """The files EnsemblePredictor loads for one network: job `job` of `run_dir` (a distilled student's
    whole-pool job) as a one-column, one-job "ensemble", with the task's thresholds `threshold` if it has them."""
    if dest.exists():
        shutil.rmtree(dest)
    (dest / "checkpoints").mkdir(parents=True)
    checkpoint = f"{job.id}.pt"
    shutil.copyfile(run_dir / "jobs" / job.id / "best.pt", dest / "checkpoints" / checkpoint)
    entry = job_entry(trained, job.model, job.id, job.column, checkpoint, channels, len(classes))
    meta = {"columns": [job.column], "jobs": [entry], "image_size": trained.data.image_size, "channels": channels,
            "num_classes": len(classes), "task": trained.task, "ensemble": "single", "method": Ensemble.WEIGHTED_VOTE,
            "boosters": [], "weights": [1.0], "threshold": threshold, "classes": classes}  # fmt: skip
    (dest / "meta.json").write_text(json.dumps(meta))
    return dest
