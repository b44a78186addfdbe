"""The files of the registered ensemble (the layout `distrain.serving.predictor` documents and loads)."""

from __future__ import annotations

import functools
import json
import shutil
from dataclasses import asdict
from pathlib import Path

from distrain.config.lookups import is_factory_name
from distrain.data.transforms import resolve_transform
from distrain.ensembles.aggregate import Aggregation, column_weights
from distrain.names import Ensemble
from distrain.study.plan import column_key
from distrain.tasks import get_task
from distrain.training.models import create_model, model_settings, on_meta


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
        trained = src.cfg.for_model(model)
        entry = {"id": j["id"], "model": model, "column": column_key(j["model"], j["seed"]), "checkpoint": checkpoint}
        network = None
        task, head = get_task(cfg.task), trained.model.head_settings()
        if task.images_per_sample > 1:  # a pair task's network: the siamese head it trained with, if any
            entry["comparison"] = list(head.comparison)
        if is_factory_name(model):  # rebuilt by importing the factory where served, with the arguments it trained with
            entry["model_args"] = model_settings(trained.model, model)
            make = functools.partial(create_model, model, **entry["model_args"])
            network = on_meta(functools.partial(task.build_model, make, store.num_classes, channels, head))
        entry["transform"] = resolve_transform(model, trained.data, channels, network).to_dict()
        jobs.append({**entry, "tta": asdict(trained.tta)})
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
