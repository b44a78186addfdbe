"""The OOF store: every finished job's predictions aligned into (model, seed) columns, checked for coverage.

Vocabulary: a *job* is one (model, seed, fold); a *column* is one (model, seed): its OOF predictions
over all folds cover every CV sample exactly once, and its test prediction is the average of its
fold models' test probabilities. numpy only; no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from distrain.errors import EnsembleError
from distrain.study.plan import column_key, parse_column


@dataclass(frozen=True)
class SampleTruth:
    """What aggregation knows of each sample besides the predictions: the fold of each CV sample (the fold
    manifest) and the label of each CV and holdout sample."""

    fold_of_sample: dict[str, int]
    labels_of_sample: dict[str, Any]


@dataclass
class OOFStore:
    """All jobs' predictions, aligned: OOF [columns, cv samples, classes], test [columns, test samples, classes]."""

    sample_ids: list[str]  # CV samples, sorted
    labels: np.ndarray  # [n] class indices; label sets: [n, L] 0/1
    folds: np.ndarray  # [n] fold id of each CV sample (the fold manifest)
    columns: list[str]  # "<model>-s<seed>"
    oof: np.ndarray  # [M, n, C]
    test_ids: list[str] = field(default_factory=list)
    test_labels: Optional[np.ndarray] = None  # [n_test]
    test: Optional[np.ndarray] = None  # [M, n_test, C] fold-averaged per column
    jobs: list[dict] = field(default_factory=list)  # id, model, seed, fold, val_score, best_epoch, best_source
    left_out: list[dict] = field(default_factory=list)  # jobs left out with --allow-partial, and why

    @property
    def num_classes(self) -> int:
        return self.oof.shape[2]


@dataclass
class JobPredictions:
    """One finished job's predictions, as read from its directory."""

    id: str
    model: str
    seed: int
    fold: int
    val_score: float
    oof_ids: list[str]
    oof_probs: np.ndarray
    test_ids: list[str]
    test_probs: Optional[np.ndarray]
    test_labels: Optional[np.ndarray]
    best_epoch: int = -1
    best_source: str = "raw"
    source: int = 0  # which of the combined run directories it comes from (`aggregate.Source`)


def build_store(
    jobs: list[JobPredictions],
    missing_jobs: list[dict],
    fold_of_sample: dict[str, int],
    labels_of_sample: dict[str, int],
    allow_partial: bool = False,
) -> OOFStore:
    """Align jobs into an OOFStore, checking that every CV sample has exactly one OOF prediction per column.

    A job whose OOF rows do not match its fold (or a job that never finished, in `missing_jobs`) is an
    EnsembleError naming it; with allow_partial its whole column is left out and listed instead.
    Jobs with different class counts are always refused.
    """
    class_counts = {j.oof_probs.shape[1] for j in jobs}
    if len(class_counts) > 1:
        by = {}
        for j in jobs:
            by.setdefault(j.oof_probs.shape[1], j.id)
        raise EnsembleError("jobs have different class counts: " + ", ".join(f"{jid} has {c}" for c, jid in by.items()))
    columns: dict[str, list[JobPredictions]] = {}
    for j in jobs:
        columns.setdefault(column_key(j.model, j.seed), []).append(j)
    problems = _coverage_problems(columns, missing_jobs, fold_of_sample)
    if problems and not allow_partial:
        first = next(iter(problems.values()))[0]
        raise EnsembleError(
            f"{first}; every CV sample needs one OOF prediction per (model, seed) "
            f"(use --allow-partial to leave such columns out)"
        )
    kept = {col: js for col, js in columns.items() if col not in problems}
    if not kept:
        raise EnsembleError("no complete (model, seed) column to ensemble")
    store = _align(kept, fold_of_sample, labels_of_sample, class_counts.pop())
    store.left_out = [{"column": col, "reason": r} for col, rs in problems.items() for r in rs]
    return store


def _coverage_problems(
    columns: dict[str, list[JobPredictions]], missing_jobs: list[dict], fold_of_sample: dict[str, int]
) -> dict[str, list[str]]:
    """column -> why it cannot be ensembled: OOF rows that are not exactly its fold's, an unfinished job,
    a fold twice."""
    members: dict[int, set[str]] = {}
    for s, f in fold_of_sample.items():
        members.setdefault(f, set()).add(s)
    problems: dict[str, list[str]] = {}
    for col, js in columns.items():
        for j in js:
            got, want = set(j.oof_ids), members.get(j.fold, set())
            if len(j.oof_ids) != len(got) or got != want:
                missing = sorted(want - got)
                problems.setdefault(col, []).append(
                    f"job {j.id}: OOF has {len(got & want)} of {len(want)} rows of fold {j.fold}"
                    + (f" (missing e.g. {missing[0]!r})" if missing else "")
                    + (f", {len(got - want)} rows from other folds" if got - want else "")
                    + (f", {len(j.oof_ids) - len(got)} duplicates" if len(j.oof_ids) != len(got) else "")
                )
    for m in missing_jobs:
        problems.setdefault(column_key(m["model"], m["seed"]), []).append(f"job {m['id']}: not finished (no OOF)")
    for col, js in columns.items():
        folds_seen = sorted(j.fold for j in js)
        if folds_seen != sorted(set(folds_seen)):
            problems.setdefault(col, []).append(f"column {col}: a fold appears twice")
    return problems


def _align(
    columns: dict[str, list[JobPredictions]],
    fold_of_sample: dict[str, int],
    labels_of_sample: dict[str, int],
    num_classes: int,
) -> OOFStore:
    """The complete columns' OOF rows placed by sample id, and their fold-averaged test probabilities."""
    ids = sorted(fold_of_sample)
    pos = {s: i for i, s in enumerate(ids)}
    jobs = [j for js in columns.values() for j in js]
    oof = np.full((len(columns), len(ids), num_classes), np.nan, dtype=np.float32)
    test_ids = next((j.test_ids for j in jobs if j.test_probs is not None), [])
    test = np.zeros((len(columns), len(test_ids), num_classes), dtype=np.float32) if test_ids else None
    test_labels = next((j.test_labels for j in jobs if j.test_labels is not None), None)
    included = []
    for k, js in enumerate(columns.values()):
        for j in sorted(js, key=lambda j: j.fold):
            oof[k, [pos[s] for s in j.oof_ids]] = j.oof_probs
            included.append({"id": j.id, "model": j.model, "seed": j.seed, "fold": j.fold, "val_score": j.val_score,
                             "best_epoch": j.best_epoch, "best_source": j.best_source, "source": j.source})  # fmt: skip
            if test is not None:
                if j.test_ids != test_ids or j.test_probs is None:
                    raise EnsembleError(f"job {j.id}: test predictions cover other samples than the other jobs")
                test[k] += j.test_probs / len(js)
    if np.isnan(oof).any():  # cannot happen after the checks above; a guard against silent NaNs
        raise EnsembleError("OOF table has holes after alignment")
    return OOFStore(sample_ids=ids, labels=np.asarray([labels_of_sample[s] for s in ids]),
                    folds=np.asarray([fold_of_sample[s] for s in ids]), columns=list(columns), oof=oof,
                    test_ids=list(test_ids), test_labels=test_labels, test=test, jobs=included)  # fmt: skip


def long_table(store: OOFStore):
    """The store as one long table keyed by (sample_id, model, seed, fold): split, label, p0..p{C-1}
    (label sets: y0..y{L-1}, the 0/1 labels, instead of label)."""
    import pandas as pd

    frames = []
    for k, col in enumerate(store.columns):
        model, seed = parse_column(col)
        df = pd.DataFrame(store.oof[k], columns=[f"p{i}" for i in range(store.num_classes)])
        _insert_labels(df, store.labels)
        df.insert(0, "fold", store.folds)
        df.insert(0, "seed", int(seed))
        df.insert(0, "model", model)
        df.insert(0, "sample_id", store.sample_ids)
        df.insert(1, "split", "oof")
        frames.append(df)
        if store.test is not None:
            t = pd.DataFrame(store.test[k], columns=[f"p{i}" for i in range(store.num_classes)])
            _insert_labels(t, store.test_labels)
            t.insert(0, "fold", -1)  # fold-averaged
            t.insert(0, "seed", int(seed))
            t.insert(0, "model", model)
            t.insert(0, "sample_id", store.test_ids)
            t.insert(1, "split", "test")
            frames.append(t)
    return pd.concat(frames, ignore_index=True)


def _insert_labels(frame, labels: Optional[np.ndarray]) -> None:
    if labels is not None and labels.ndim == 2:
        for j in reversed(range(labels.shape[1])):
            frame.insert(0, f"y{j}", labels[:, j])
    else:
        frame.insert(0, "label", labels)
