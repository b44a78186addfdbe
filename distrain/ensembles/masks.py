"""Aggregation of a segmentation study, the computing half: every job's and ensemble's mean IoU (or F-score) from
the stored class-probability maps, against the masks read from the shards on the same grid
(`tasks.semantic.label_grid`, the function training's label rows come from).

- `best_single`: the (model, seed) column with the best CV score; on the holdout, its fold models' mean maps;
- `mean_of_maps`: the columns' maps averaged, then the argmax per pixel;
- `k_of_n`: per pixel the class at least k = ceil(ensemble.vote_fraction x M) of the M columns predict (background,
  class 0, where none does);
- `fold_vote` (holdout only): the same per pixel over the best column's K fold models.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from distrain.config import Config
from distrain.data.index import read_index
from distrain.data.shards import read_annotation, shard_samples
from distrain.ensembles.aggregate import MapAggregation, Source, load_store
from distrain.ensembles.dense import votes_needed
from distrain.ensembles.report import Report
from distrain.ensembles.store import OOFStore, SampleTruth
from distrain.names import JobStatus
from distrain.study.plan import column_key
from distrain.tasks.semantic import fit_mask, grid_side, k_of_n_pixels, label_grid, mask_scores

MaskAggregation = MapAggregation
"""A segmentation study's aggregation: the report."""


def read_label_rows(cfg: Config) -> dict[str, np.ndarray]:
    """Every sample's mask (CV and holdout) as its label row on the stored grid."""
    index, size = read_index(cfg.data.root), cfg.data.image_size
    side, rows = grid_side(size, cfg.data.num_classes), {}
    for url in index.urls("cv") + index.urls("test"):
        for ref in shard_samples(url):
            with Image.open(io.BytesIO(read_annotation(ref))) as mask:
                rows[ref.sample_id] = label_grid(fit_mask(np.asarray(mask), size), side).ravel()
    return rows


def _voted(maps: np.ndarray, k: int, classes: int) -> np.ndarray:
    """[M, n, C x side²] -> one-hot rows [n, C x side²] of the per-pixel k-of-M vote."""
    m, n = maps.shape[:2]
    grids = maps.reshape(m, n, classes, -1)
    decided = np.stack([k_of_n_pixels(grids[:, j, :, :, None], k)[:, 0] for j in range(n)])  # [n, side²]
    return np.eye(classes, dtype=np.float32)[decided].transpose(0, 2, 1).reshape(n, -1)


def compute_mask_aggregation(cfg: Config, sources: list[Source], truth: SampleTruth, failed_jobs: list[dict],
                             allow_partial: bool, mlflow_info: dict) -> MaskAggregation:  # fmt: skip
    """The report of a segmentation study's finished jobs; writes nothing."""
    store, test_by_job = load_store(cfg, sources, truth, allow_partial or bool(failed_jobs))
    metric, classes, rows = cfg.train.metric, cfg.data.num_classes, read_label_rows(cfg)
    cv_labels = np.stack([rows[s] for s in store.sample_ids])
    test_labels = np.stack([rows[s] for s in store.test_ids]) if store.test_ids else None

    def score(labels, probs) -> float | None:
        return None if labels is None or probs is None else mask_scores(labels, probs)[metric]

    m = len(store.columns)
    column_cv = [score(cv_labels, store.oof[c]) for c in range(m)]
    best, k = int(np.argmax(column_cv)), votes_needed(cfg.ensemble.vote_fraction, m)
    report = _report(cfg, store, test_by_job, test_labels, score, mlflow_info)
    report.failed_jobs = list(failed_jobs)
    has_test = test_by_job is not None and test_labels is not None
    fold_jobs = [i for i, j in enumerate(store.jobs) if column_key(j["model"], j["seed"]) == store.columns[best]]
    k_folds = votes_needed(cfg.ensemble.vote_fraction, len(fold_jobs))
    fold_voted = _voted(test_by_job[fold_jobs], k_folds, classes) if has_test else None
    report.ensembles = {
        "best_single": {"cv": column_cv[best], "test": score(test_labels, store.test[best] if has_test else None)},
        "mean_of_maps": {"cv": score(cv_labels, store.oof.mean(0)),
                         "test": score(test_labels, store.test.mean(0) if has_test else None)},
        "k_of_n": {"cv": score(cv_labels, _voted(store.oof, k, classes)),
                   "test": score(test_labels, _voted(store.test, k, classes) if has_test else None)},
        "fold_vote": {"cv": None, "test": score(test_labels, fold_voted)},
    }  # fmt: skip
    report.ensemble_details = {
        "best_single_column": store.columns[best], "columns": store.columns,
        "column_cv": dict(zip(store.columns, column_cv)), "k_of_n": {"k": k, "n": m},
        "fold_vote": {"column": store.columns[best], "k": k_folds, "n": len(fold_jobs)},
        "left_out": store.left_out, "skipped": {} if has_test else {"fold_vote": "no holdout images"},
    }  # fmt: skip
    return MaskAggregation(cfg, report, sources)


def _report(cfg: Config, store: OOFStore, test_by_job: np.ndarray | None, test_labels: np.ndarray | None, score,
            mlflow_info: dict) -> Report:  # fmt: skip
    """The jobs (their training-time score is the metric on the same label rows) and the CV mean and spread."""
    rows = [{"id": j["id"], "model": j["model"], "seed": j["seed"], "fold": j["fold"], "status": JobStatus.DONE,
             "val_score": float(j["val_score"]), "best_epoch": j["best_epoch"],
             "best_source": j.get("best_source", "raw"),
             "test_score": score(test_labels, test_by_job[i] if test_by_job is not None else None)}
            for i, j in enumerate(store.jobs)]  # fmt: skip
    scores = np.array([r["val_score"] for r in rows])
    fold_average = score(test_labels, test_by_job.mean(0) if test_by_job is not None else None)
    return Report(
        experiment=cfg.experiment, task=cfg.task, metric=cfg.train.metric, jobs=rows,
        cv={"mean": float(scores.mean()), "std": float(scores.std(ddof=1)) if len(scores) > 1 else 0.0},
        test={"fold_average": fold_average, "n_samples": len(store.test_ids),
              "fold_average_by_model_seed": {c: score(test_labels, store.test[i] if store.test is not None else None)
                                             for i, c in enumerate(store.columns)}},
        mlflow=mlflow_info,
    )  # fmt: skip
