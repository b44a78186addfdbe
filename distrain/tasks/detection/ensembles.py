"""The text-detection ensembles of a study's columns (a column is one backbone x seed: its K fold models, each
predicting the CV images of the fold it held out, and all of them the holdout), each with an honest CV H-mean:

- every column alone, post-processed at the default settings and at settings tuned on OOF with fold honesty;
- `map_average`: the columns' probability maps averaged per image, then post-processed (tuned likewise);
- `box_vote`: each column's boxes (at its own fold-honest settings) kept where at least k of the M columns found
  them (`voting.vote_boxes`, weighted box fusion).

On the holdout the same rules apply to the test maps (a column's test map is the mean of its K fold models' maps),
and `fold_vote` is the practitioners' "Voting >= 3" of the K fold models of one column: it needs the fold models'
maps of each holdout image separately, which only the holdout has (an OOF image has one model per column).

Images are streamed one at a time: memory holds the M maps of one image and a table of counts, never the
store's maps."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from distrain.tasks.detection.geometry import TextRegions
from distrain.tasks.detection.hmean import DetectionCounts, count_matches
from distrain.tasks.detection.postprocess import PostprocessSettings, boxes_from_map
from distrain.tasks.detection.tuning import (
    DEFAULT_GRID,
    TunedPostprocess,
    choose_settings,
    grid_settings,
    image_counts,
)  # fmt: skip
from distrain.tasks.detection.voting import vote_boxes

MapsOf = Callable[[int], np.ndarray]
"""Image index -> that image's maps [M, h, w] (one per column), read from the store when asked."""


@dataclass
class EnsembleScore:
    """One ensemble's honest CV H-mean (and at default settings where tuning applies), and how it was tuned."""

    cv: float
    cv_default: float | None = None
    tuned: dict | None = None
    extra: dict = field(default_factory=dict)

    @classmethod
    def of(cls, tuned: TunedPostprocess) -> EnsembleScore:
        return cls(cv=tuned.cv_tuned, cv_default=tuned.cv_default, tuned=tuned.as_dict())


def tuned_columns(
    maps_of: MapsOf, n_columns: int, truths: list[TextRegions], folds: np.ndarray,
    base: PostprocessSettings = PostprocessSettings(), grid: dict = DEFAULT_GRID,
) -> tuple[list[TunedPostprocess], TunedPostprocess, np.ndarray]:  # fmt: skip
    """Every column's and the map average's fold-honest tuning, in one pass over the images: each image's M maps
    are read once and counted at every setting. Also each column's counts of every image at `base` [M, n, 3]
    (matched, words, detections): a job's score at the default settings is the sum over its fold's images."""
    settings = grid_settings(base, grid)
    tables = np.zeros((n_columns + 1, len(settings), len(truths), 3), np.int64)  # the last: the map average
    for j, truth in enumerate(truths):
        maps = maps_of(j)
        for m in range(n_columns):
            tables[m, :, j] = image_counts(maps[m], truth, settings)
        tables[n_columns, :, j] = image_counts(maps.mean(axis=0), truth, settings)
    tuned = [choose_settings(table, folds, settings) for table in tables]
    return tuned[:n_columns], tuned[n_columns], tables[:n_columns, 0]  # settings[0] is `base`


def box_vote(maps_of: MapsOf, truths: list[TextRegions], folds: np.ndarray, tunings: list[TunedPostprocess],
             k: int, iou_threshold: float = 0.5) -> EnsembleScore:  # fmt: skip
    """Boxes of each column at the settings its tuning chose for the image's fold (chosen on the other folds),
    kept where >= k of the columns agree. k is configured, not tuned, so this score is honest as it stands."""
    total = DetectionCounts()
    for j, truth in enumerate(truths):
        maps = maps_of(j)
        members = [boxes_from_map(maps[m], tunings[m].per_fold[int(folds[j])]) for m in range(len(maps))]
        total = total + count_matches(truth, vote_boxes(members, k, iou_threshold))
    return EnsembleScore(cv=total.hmean, extra={"k": k, "n": len(tunings), "iou": iou_threshold,
                                                "precision": total.precision, "recall": total.recall})  # fmt: skip


def detection_ensembles(maps_of: MapsOf, n_columns: int, truths: list[TextRegions], folds: np.ndarray, k: int,
                        base: PostprocessSettings = PostprocessSettings(), grid: dict = DEFAULT_GRID,
                        iou_threshold: float = 0.5) -> dict[str, EnsembleScore]:  # fmt: skip
    """Every column and both CV ensembles, by name (`column-<m>`, `map_average`, `box_vote`): two passes over the
    images (counting, then voting at the tuned settings)."""
    columns, average, _ = tuned_columns(maps_of, n_columns, truths, folds, base, grid)
    scores = {f"column-{m}": EnsembleScore.of(t) for m, t in enumerate(columns)}
    scores["map_average"] = EnsembleScore.of(average)
    scores["box_vote"] = box_vote(maps_of, truths, folds, columns, k, iou_threshold)
    return scores


def fold_vote(fold_maps: Sequence[np.ndarray], truth: TextRegions, settings: PostprocessSettings, k: int,
              iou_threshold: float = 0.5) -> DetectionCounts:  # fmt: skip
    """One holdout image's counts when its K fold models vote (>= k of K) at `settings` (the column's final
    tuned settings): the practitioners' "Voting >= 3" of 5."""
    members = [boxes_from_map(m, settings) for m in fold_maps]
    return count_matches(truth, vote_boxes(members, k, iou_threshold))
