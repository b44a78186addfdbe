"""A finished study's fold models as teachers: what each fold's ensemble (the weighted mean of every column's
fold-m model, with the registered ensemble's weights) gives the samples of some shards, read in chunks."""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from distrain.serving.predictor import EnsemblePredictor, shard_chunks

FOLD_OF_JOB = re.compile(r"-f(\d+)$")
"""A fold job's id ends in -f<fold> (`study.plan.Job.id`)."""


@dataclass(frozen=True)
class FoldRows:
    sample_ids: list[str]
    probs: np.ndarray  # [K, n, C]: fold m's ensemble's probabilities
    votes: np.ndarray  # [K, n]: the columns whose fold-m model decides fold m's ensemble's class
    columns: int


def fold_ensemble_rows(predictor: EnsemblePredictor, urls: list[str], folds: int, chunk: int = 1024) -> FoldRows:
    """Each fold's ensemble's rows of every sample of `urls` (sorted by id). A registered stacking model counts as
    its weighted vote (the same weights meta.json keeps); columns weighted 0 are not run."""
    weight = dict(zip(predictor.meta["columns"], predictor.meta["weights"]))
    weighted = {c for c, w in weight.items() if w != 0}
    ids, probs, votes = [], [], []
    for chunk_ids, samples in shard_chunks(urls, chunk):
        rows = np.zeros((folds, len(samples), predictor.meta["num_classes"]), np.float32)
        decisions: list[tuple[int, np.ndarray]] = []
        for job, p in predictor.job_probs(samples, weighted):
            fold = int(FOLD_OF_JOB.search(job["id"]).group(1))
            rows[fold] += weight[job["column"]] * p
            decisions.append((fold, p.argmax(axis=1)))
        chosen = rows.argmax(axis=2)
        count = np.zeros((folds, len(samples)), np.int32)
        for fold, decided in decisions:
            count[fold] += decided == chosen[fold]
        ids += chunk_ids
        probs.append(rows)
        votes.append(count)
    return FoldRows(ids, np.concatenate(probs, axis=1), np.concatenate(votes, axis=1), len(weighted))
