"""Aggregation of a dense task (text detection), the computing half: every job's H-mean and the ensembles' from
the stored probability maps, with the DB post-processing tuned on OOF with fold honesty (`tasks.detection`).

- a job's score: its OOF maps post-processed at the default settings (training chose its epoch by pixel F1);
- `best_single`: the (model, seed) column with the best honest tuned CV H-mean; on the holdout, its fold models'
  mean map at the settings tuned on all its OOF maps;
- `map_average`: the columns' maps averaged per image, then post-processed (tuned likewise);
- `box_vote`: each column's boxes kept where at least k = ceil(ensemble.vote_fraction x M) of the M columns found
  them (IoU >= ensemble.box_iou), merged by weighted box fusion;
- `fold_vote` (holdout only: a CV image has one model per column): the best column's K fold models vote, k =
  ceil(vote_fraction x K): the practitioners' "Voting >= 3" of 5.

Truths are read from the shards (words and image sizes) and put on the maps' grid; H-mean is scale-free.
Memory: the OOF store holds every column's maps (`tasks.detection.task.MAX_MAP_SIDE`), as classification's does
its probability rows.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from distrain.config import Config
from distrain.data.index import read_index
from distrain.data.shards import read_annotation, read_image, shard_samples
from distrain.ensembles.aggregate import MapAggregation, Source, load_store
from distrain.ensembles.report import Report
from distrain.ensembles.store import OOFStore, SampleTruth
from distrain.errors import EnsembleError
from distrain.names import JobStatus
from distrain.study.plan import column_key
from distrain.tasks.detection.augment import scaled
from distrain.tasks.detection.ensembles import box_vote, tuned_columns
from distrain.tasks.detection.geometry import TextRegions
from distrain.tasks.detection.hmean import DetectionCounts, count_matches
from distrain.tasks.detection.postprocess import PostprocessSettings, boxes_from_map
from distrain.tasks.detection.task import map_side
from distrain.tasks.detection.tuning import TunedPostprocess
from distrain.tasks.detection.voting import vote_boxes

METRIC = "hmean"


@dataclass
class DenseAggregation(MapAggregation):
    """A text-detection study's aggregation: the report (metric H-mean), the tuned post-processing and the worst
    OOF images."""

    postprocess: dict[str, dict]
    worst: list[dict]
    """The best column's OOF images with the lowest H-mean at its fold-honest settings: {sample_id, hmean, truth,
    found} (polygons on the maps' grid), for the review."""


def read_truths(cfg: Config) -> dict[str, TextRegions]:
    """Every sample's words (CV and holdout), in the coordinates of its stored map."""
    index, side = read_index(cfg.data.root), map_side(cfg.data.image_size)
    truths = {}
    for url in index.urls("cv") + index.urls("test"):
        for ref in shard_samples(url):
            with Image.open(io.BytesIO(read_image(ref))) as image:
                longer = max(image.size)
            truths[ref.sample_id] = scaled(TextRegions.from_json(read_annotation(ref)), side / longer)
    return truths


def _hmean(maps: np.ndarray, truths: list[TextRegions], settings: PostprocessSettings) -> float:
    total = DetectionCounts()
    for prob, truth in zip(maps, truths):
        total = total + count_matches(truth, boxes_from_map(prob, settings))
    return total.hmean


def votes_needed(fraction: float, n: int) -> int:
    """k of 'at least k of n' (ceil, at least 1): 0.6 of 5 is 3."""
    return max(1, min(n, math.ceil(fraction * n - 1e-9)))


def compute_dense_aggregation(cfg: Config, sources: list[Source], truth: SampleTruth, failed_jobs: list[dict],
                              allow_partial: bool, mlflow_info: dict) -> DenseAggregation:  # fmt: skip
    """The report of a dense study's finished jobs: jobs, CV, holdout and every ensemble in H-mean; writes nothing."""
    try:
        store, test_by_job = load_store(cfg, sources, truth, allow_partial or bool(failed_jobs))
    except EnsembleError as e:
        if not failed_jobs:
            raise
        raise EnsembleError(f"{e}: {len(failed_jobs)} job(s) failed for good; `distrain retry` them first") from None
    side, ec = map_side(cfg.data.image_size), cfg.ensemble
    truths = read_truths(cfg)
    cv_truths = [truths[s] for s in store.sample_ids]
    test_truths = [truths[s] for s in store.test_ids]
    m = len(store.columns)
    oof = store.oof.reshape(m, len(store.sample_ids), side, side)
    columns, average, default_counts = tuned_columns(lambda j: oof[:, j], m, cv_truths, store.folds)
    k = votes_needed(ec.vote_fraction, m)
    voted = box_vote(lambda j: oof[:, j], cv_truths, store.folds, columns, k, ec.box_iou)
    best = int(np.argmax([c.cv_tuned for c in columns]))
    report = _report(cfg, store, test_by_job, side, default_counts, test_truths, mlflow_info)
    report.failed_jobs = list(failed_jobs)
    tests = _holdout(cfg, store, test_by_job, side, test_truths, columns, average, best, k)
    report.ensembles = {
        "best_single": {"cv": columns[best].cv_tuned, "test": tests.get("best_single")},
        "map_average": {"cv": average.cv_tuned, "test": tests.get("map_average")},
        "box_vote": {"cv": voted.cv, "test": tests.get("box_vote")},
        "fold_vote": {"cv": None, "test": tests.get("fold_vote")},
    }
    postprocess = {c: t.as_dict() for c, t in zip(store.columns, columns)} | {"map_average": average.as_dict()}
    report.ensemble_details = {
        "best_single_column": store.columns[best],
        "columns": store.columns,
        "postprocess": {
            name: {"cv_default": t["cv_default"], "cv_tuned": t["cv_tuned"], "final": t["final"]}
            for name, t in postprocess.items()
        },  # fmt: skip
        "box_vote": voted.extra,
        "fold_vote": tests.get("fold_vote_details"),
        "left_out": store.left_out,
        "skipped": {} if store.test_ids else {"fold_vote": "no holdout images"},
    }
    worst = worst_images(oof[best], cv_truths, store.folds, columns[best], store.sample_ids)
    return DenseAggregation(cfg, report, sources, postprocess, worst)


def worst_images(maps: np.ndarray, truths: list[TextRegions], folds: np.ndarray, tuned: TunedPostprocess,
                 sample_ids: list[str], n: int = 4) -> list[dict]:  # fmt: skip
    """The `n` images of one column's OOF maps with the lowest H-mean, each at its fold's tuned settings."""
    rows = []
    for j, truth in enumerate(truths):
        found = boxes_from_map(maps[j], tuned.per_fold[int(folds[j])])
        rows.append({"sample_id": sample_ids[j], "hmean": count_matches(truth, found).hmean, "truth": truth,
                     "found": found})  # fmt: skip
    return sorted(rows, key=lambda r: (r["hmean"], r["sample_id"]))[:n]


def draw_worst_images(agg: DenseAggregation, out_dir: Path) -> list[Path]:
    """Each of `agg.worst` as a PNG in `out_dir`: the image with its words (green; don't-care grey) and the boxes
    found (red), worst first."""
    from PIL import ImageDraw

    for old in out_dir.glob("worst-*.png"):  # a previous aggregation's
        old.unlink()
    refs = {r.sample_id: r for url in read_index(agg.cfg.data.root).urls("cv") for r in shard_samples(url)}
    side, paths = map_side(agg.cfg.data.image_size), []
    for rank, row in enumerate(agg.worst):
        with Image.open(io.BytesIO(read_image(refs[row["sample_id"]]))) as opened:
            image = opened.convert("RGB")
        back, draw = max(image.size) / side, ImageDraw.Draw(image)
        for polygon, ignore in zip(row["truth"].polygons, row["truth"].ignore):
            draw.polygon([tuple(p) for p in polygon * back], outline=(150, 150, 150) if ignore else (0, 170, 0))
        for polygon in row["found"].polygons:
            draw.polygon([tuple(p) for p in polygon * back], outline=(220, 0, 0))
        path = out_dir / f"worst-{rank}-{row['sample_id']}-hmean-{row['hmean']:.2f}.png"
        image.save(path)
        paths.append(path)
    return paths


def _report(cfg: Config, store: OOFStore, test_by_job: np.ndarray | None, side: int, default_counts: np.ndarray,
            test_truths: list[TextRegions], mlflow_info: dict) -> Report:  # fmt: skip
    """Jobs at the default post-processing: H-mean of each job's own fold (from `default_counts` [M, n, 3], each
    column's counts of every CV image at the default settings) and of its holdout maps."""
    base, rows = PostprocessSettings(), []
    for i, job in enumerate(store.jobs):
        column = store.columns.index(column_key(job["model"], job["seed"]))
        own = DetectionCounts(*(int(c) for c in default_counts[column, store.folds == job["fold"]].sum(axis=0)))
        test = (_hmean(test_by_job[i].reshape(-1, side, side), test_truths, base)
                if test_by_job is not None else None)  # fmt: skip
        rows.append({"id": job["id"], "model": job["model"], "seed": job["seed"], "fold": job["fold"],
                     "status": JobStatus.DONE, "val_score": own.hmean,
                     "val_pixel_f1": float(job["val_score"]), "best_epoch": job["best_epoch"],
                     "best_source": job.get("best_source", "raw"), "test_score": test})  # fmt: skip
    scores = np.array([r["val_score"] for r in rows])
    has_test = test_by_job is not None and len(test_truths) > 0
    return Report(
        experiment=cfg.experiment, task=cfg.task, metric=METRIC, jobs=rows,
        cv={"mean": float(scores.mean()), "std": float(scores.std(ddof=1)) if len(scores) > 1 else 0.0},
        test={"fold_average": _hmean(test_by_job.mean(0).reshape(-1, side, side), test_truths, base)
              if has_test else None,
              "fold_average_by_model_seed": {c: _hmean(store.test[k].reshape(-1, side, side), test_truths, base)
                                             if has_test else None for k, c in enumerate(store.columns)},
              "n_samples": len(store.test_ids)},
        mlflow=mlflow_info,
    )  # fmt: skip


def _holdout(cfg: Config, store: OOFStore, test_by_job: np.ndarray | None, side: int, truths: list[TextRegions],
             columns: list[TunedPostprocess], average: TunedPostprocess, best: int, k: int) -> dict:  # fmt: skip
    """The ensembles' holdout H-mean, each at the settings tuned on all the OOF maps."""
    if test_by_job is None or not truths:
        return {}
    m, iou = len(columns), cfg.ensemble.box_iou
    test = store.test.reshape(m, len(truths), side, side)
    fold_jobs = [i for i, j in enumerate(store.jobs) if column_key(j["model"], j["seed"]) == store.columns[best]]
    k_folds = votes_needed(cfg.ensemble.vote_fraction, len(fold_jobs))
    totals = {name: DetectionCounts() for name in ("best_single", "map_average", "box_vote", "fold_vote")}
    for j, truth in enumerate(truths):
        boxes = [boxes_from_map(test[c, j], columns[c].final) for c in range(m)]
        totals["best_single"] += count_matches(truth, boxes[best])
        totals["map_average"] += count_matches(truth, boxes_from_map(test[:, j].mean(0), average.final))
        totals["box_vote"] += count_matches(truth, vote_boxes(boxes, k, iou))
        folds = [boxes_from_map(test_by_job[i, j].reshape(side, side), columns[best].final) for i in fold_jobs]
        totals["fold_vote"] += count_matches(truth, vote_boxes(folds, k_folds, iou))
    out = {name: c.hmean for name, c in totals.items()}
    out["fold_vote_details"] = {
        "column": store.columns[best],
        "k": k_folds,
        "n": len(fold_jobs),
        "iou": iou,
        "precision": totals["fold_vote"].precision,
        "recall": totals["fold_vote"].recall,
    }
    return out
