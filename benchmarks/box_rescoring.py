"""Would LightGBM rescoring of candidate boxes beat the tuned DB post-processing? Measured on a finished
text-detection study's OOF maps, fold-honestly, side by side with the study's own `best_single` (its best column
at the settings tuned on the other folds).

Candidates: the best column's boxes at its fold's tuned `thresh` / `unclip_ratio` and a low `box_thresh` (0.05).
Features of a candidate: its mean probability in the best column's map, in every other column's map and in their
average; its rectangle's area, sides and aspect. Label: it matches a (cared-for) word at IoU > 0.5. For fold k a
LightGBM classifier is trained on the other folds' candidates, the keep-threshold on its probability is chosen on
those folds' own out-of-fold predictions (nested), and fold k's candidates above it are scored by the H-mean.

    python benchmarks/box_rescoring.py --run-dir runs/synth_text

Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from distrain.ensembles.dense import read_truths
from distrain.orchestration.phases import load_run_dir
from distrain.study.plan import column_key
from distrain.tasks.detection.geometry import TextRegions, iou_matrix
from distrain.tasks.detection.hmean import DetectionCounts, count_matches
from distrain.tasks.detection.postprocess import PostprocessSettings, box_score, boxes_from_map
from distrain.tasks.detection.task import map_side

THRESHOLDS = np.round(np.arange(0.05, 0.96, 0.05), 2)


def oof_maps(run_dir: Path, report: dict, side: int) -> dict[str, dict[str, np.ndarray]]:
    """column -> sample id -> its OOF map."""
    maps: dict[str, dict[str, np.ndarray]] = {}
    for job in report["jobs"]:
        oof = np.load(run_dir / "jobs" / job["id"] / "oof.npz")
        column = maps.setdefault(column_key(job["model"], job["seed"]), {})
        for sample_id, row in zip(oof["sample_ids"], oof["probs"]):
            column[str(sample_id)] = row.reshape(side, side)
    return maps


def candidates(maps: list[np.ndarray], settings: PostprocessSettings) -> tuple[TextRegions, np.ndarray]:
    """The best column's (maps[0]) boxes at a low box_thresh, and their features [n, f]."""
    import cv2

    found = boxes_from_map(maps[0], replace(settings, box_thresh=0.05))
    mean = np.mean(maps, axis=0)
    rows = []
    for polygon, score in zip(found.polygons, found.scores):
        (_, _), (w, h), _ = cv2.minAreaRect(polygon.astype(np.float32))
        others = [box_score(m, polygon) for m in maps[1:]]
        sides = (max(w, h), min(w, h))
        rows.append([score, *others, box_score(mean, polygon), w * h, *sides, sides[0] / max(sides[1], 1)])
    return found, np.asarray(rows, np.float64).reshape(len(rows), len(maps) + 5)


def labels_of(found: TextRegions, truth: TextRegions) -> np.ndarray:
    """1 where a candidate overlaps a cared-for word at IoU > 0.5, 0 elsewhere, -1 on a don't-care word."""
    if not len(found):
        return np.zeros(0, np.int64)
    iou, _ = iou_matrix(truth.polygons, found.polygons)
    care = ~truth.ignore
    positive = (iou[care] > 0.5).any(axis=0) if care.any() else np.zeros(len(found), bool)
    dont = (iou[truth.ignore] > 0.5).any(axis=0) if truth.ignore.any() else np.zeros(len(found), bool)
    return np.where(positive, 1, np.where(dont, -1, 0))


def fit(features: np.ndarray, labels: np.ndarray):
    import lightgbm as lgb

    keep = labels >= 0
    model = lgb.LGBMClassifier(n_estimators=200, learning_rate=0.05, num_leaves=15, min_child_samples=10, verbose=-1)
    return model.fit(features[keep], labels[keep])


def hmean_at(images: list[dict], probs: list[np.ndarray], threshold: float) -> DetectionCounts:
    total = DetectionCounts()
    for image, p in zip(images, probs):
        kept = TextRegions([q for q, keep in zip(image["found"].polygons, p >= threshold) if keep])
        total = total + count_matches(image["truth"], kept)
    return total


def load_images(run_dir: Path) -> tuple[list[dict], str, int]:
    """Every CV image with its candidates, their features and labels, and the tuned baseline's counts; the best
    column; the number of columns."""
    cfg, report = load_run_dir(run_dir), json.loads((run_dir / "report.json").read_text())
    tuned = json.loads((run_dir / "ensemble" / "postprocess.json").read_text())
    folds = json.loads((run_dir / "folds.json").read_text())["fold_of_sample"]
    best = report["ensemble_details"]["best_single_column"]
    columns = [best] + [c for c in report["ensemble_details"]["columns"] if c != best]
    maps, truths = oof_maps(run_dir, report, map_side(cfg.data.image_size)), read_truths(cfg)
    images = []
    for sample_id in sorted(maps[best]):
        settings = PostprocessSettings(**tuned[best]["per_fold"][str(folds[sample_id])])
        found, features = candidates([maps[c][sample_id] for c in columns], settings)
        truth = truths[sample_id]
        images.append({"fold": folds[sample_id], "found": found, "features": features, "truth": truth,
                       "labels": labels_of(found, truth),
                       "baseline": count_matches(truth, boxes_from_map(maps[best][sample_id], settings))})  # fmt: skip
    return images, best, len(columns)


def predict(model, part: list[dict]) -> list[np.ndarray]:
    return [model.predict_proba(im["features"])[:, 1] if len(im["features"]) else np.zeros(0) for im in part]


def cross_validate(images: list[dict]) -> tuple[DetectionCounts, DetectionCounts]:
    """(rescored, tuned baseline) counts over the CV images, each fold scored by models that never saw it."""
    fold_ids = sorted({im["fold"] for im in images})

    def trained_on(train_folds):
        part = [im for im in images if im["fold"] in train_folds]
        return fit(np.concatenate([im["features"] for im in part]), np.concatenate([im["labels"] for im in part]))

    honest, baseline = DetectionCounts(), DetectionCounts()
    for k in fold_ids:
        others = [f for f in fold_ids if f != k]
        inner_images, inner_probs = [], []
        for held in others:  # the other folds' own out-of-fold predictions choose the threshold
            part = [im for im in images if im["fold"] == held]
            inner_images += part
            inner_probs += predict(trained_on([f for f in others if f != held]), part)
        threshold = max(THRESHOLDS, key=lambda t: hmean_at(inner_images, inner_probs, t).hmean)
        part = [im for im in images if im["fold"] == k]
        honest = honest + hmean_at(part, predict(trained_on(others), part), float(threshold))
        for im in part:
            baseline = baseline + im["baseline"]
    return honest, baseline


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run-dir", required=True)
    run_dir = Path(ap.parse_args().run_dir)
    images, best, n_columns = load_images(run_dir)
    honest, baseline = cross_validate(images)
    n_candidates = sum(len(im["found"]) for im in images)
    ratio = honest.hmean / max(baseline.hmean, 1e-12)
    print(f"{len(images)} CV images, {n_candidates} candidate boxes of {best} ({n_columns - 1} other columns' maps "
          f"as features)")  # fmt: skip
    for name, c in (("best_single, tuned post-processing", baseline), ("LightGBM rescoring, nested threshold", honest)):
        print(f"{name:<40} H-mean {c.hmean:.4f} (P {c.precision:.4f}, R {c.recall:.4f}), fold-honest")
    print(f"ratio rescored / tuned = {ratio:.4f}")
    print(json.dumps({"benchmark": "box_rescoring", "run_dir": str(run_dir), "images": len(images),
                      "candidates": n_candidates, "hmean_tuned": round(baseline.hmean, 4),
                      "hmean_rescored": round(honest.hmean, 4), "ratio": round(ratio, 4)}))  # fmt: skip


if __name__ == "__main__":
    main()
