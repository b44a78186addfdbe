"""Box voting over n models (the practitioners' "Voting >= 3" of 5 fold models): a text box is kept where at
least k of the n models found it (boxes at IoU >= `iou_threshold`, at most one per model), merged by weighted
box fusion (each corner the score-weighted mean of the cluster's corners; the score the summed scores over n, so
a box three of five models found at 0.9 scores 0.54)."""

from __future__ import annotations

import numpy as np

from distrain.tasks.detection.geometry import TextRegions, iou_matrix


def vote_boxes(members: list[TextRegions], k: int, iou_threshold: float = 0.5) -> TextRegions:
    """The boxes found by at least `k` of the `members` (one image's detections per model). Clusters are grown
    greedily from the highest-scoring box not yet used: from each other model, its unused box of highest IoU
    with the seed, if that IoU reaches the threshold."""
    n = len(members)
    if not 1 <= k <= max(n, 1):
        raise ValueError(f"box voting needs 1 <= k <= n models, got k={k} of n={n}")
    polygons = [p for m in members for p in m.polygons]
    if not polygons:
        return TextRegions()
    owner = np.concatenate([np.full(len(m), i) for i, m in enumerate(members)])
    scores = np.concatenate([m.scores for m in members]).astype(np.float64)
    iou, _ = iou_matrix(polygons, polygons)
    used = np.zeros(len(polygons), bool)
    kept, kept_scores = [], []
    for seed in np.argsort(-scores, kind="stable"):
        if used[seed]:
            continue
        cluster = [seed]
        for model in range(n):
            if model == owner[seed]:
                continue
            candidates = np.flatnonzero((owner == model) & ~used & (iou[seed] >= iou_threshold))
            if len(candidates):
                cluster.append(candidates[np.argmax(iou[seed, candidates])])
        used[cluster] = True  # a box in a cluster too small to keep is not reused for another
        if len(cluster) >= k:
            kept.append(fuse([polygons[i] for i in cluster], scores[cluster]))
            kept_scores.append(scores[cluster].sum() / n)
    return TextRegions(kept, scores=np.asarray(kept_scores, np.float32))


def fuse(polygons: list[np.ndarray], scores: np.ndarray) -> np.ndarray:
    """The score-weighted mean of polygons with the same number of points in the same order (the 4 ordered
    corners post-processing gives); otherwise the highest-scoring polygon."""
    if len({len(p) for p in polygons}) != 1:
        return polygons[int(np.argmax(scores))]
    weights = np.maximum(scores, 1e-12) / np.maximum(scores, 1e-12).sum()
    return np.tensordot(weights, np.stack(polygons), axes=1)
