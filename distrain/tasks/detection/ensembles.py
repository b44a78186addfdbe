"""The text-detection ensembles of a study's columns (a column is one backbone x seed: its K fold models, each
predicting the CV images of the fold it held out, and all of them the holdout), each with an honest CV H-mean:

- every column alone, post-processed at the default settings and at settings tuned on OOF with fold honesty;
- `map_average`: the columns' probability maps averaged per image, then post-processed (tuned likewise);
- `box_vote`: each column's boxes (at its own fold-honest settings) kept where at least k of the M columns found
  them (`voting.vote_boxes`, weighted box fusion).

On the holdout the same rules apply to the test maps (a column's test map is the mean of its K fold models' maps),
and `fold_vote` is the practitioners' "Voting >= 3" of the K fold models of one column: it needs the fold models'
maps of each holdout image separately, which only the holdout has (an OOF image has one model per column).

Images are streamed one at a time: memory holds M maps of one image, never the store."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from distrain.tasks.detection.geometry import TextRegions
from distrain.tasks.detection.hmean import DetectionCounts, count_matches
from distrain.tasks.detection.postprocess import PostprocessSettings, boxes_from_map
from distrain.tasks.detection.tuning import DEFAULT_GRID, TunedPostprocess, tune_postprocess
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


def _tuned(maps: Sequence[np.ndarray], truths, folds, base, grid) -> tuple[EnsembleScore, TunedPostprocess]:
    tuned = tune_postprocess(list(maps), truths, folds, base, grid)
    return EnsembleScore(cv=tuned.cv_tuned, cv_default=tuned.cv_default, tuned=tuned.as_dict()), tuned


def column_scores(maps_of: MapsOf, n_columns: int, truths: list[TextRegions], folds: np.ndarray,
                  base: PostprocessSettings = PostprocessSettings(),
                  grid: dict = DEFAULT_GRID) -> tuple[list[EnsembleScore], list[TunedPostprocess]]:  # fmt: skip
    """Each column alone: default and honestly tuned CV H-mean."""
    scores, tunings = [], []
    for m in range(n_columns):
        score, tuned = _tuned([maps_of(j)[m] for j in range(len(truths))], truths, folds, base, grid)
        scores.append(score)
        tunings.append(tuned)
    return scores, tunings


def map_average(maps_of: MapsOf, truths: list[TextRegions], folds: np.ndarray,
                base: PostprocessSettings = PostprocessSettings(),
                grid: dict = DEFAULT_GRID) -> EnsembleScore:  # fmt: skip
    """The columns' maps averaged per image, then post-processed at honestly tuned settings."""
    return _tuned([maps_of(j).mean(axis=0) for j in range(len(truths))], truths, folds, base, grid)[0]


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
    """Every column and both CV ensembles, by name (`column-<m>`, `map_average`, `box_vote`)."""
    columns, tunings = column_scores(maps_of, n_columns, truths, folds, base, grid)
    scores = {f"column-{m}": s for m, s in enumerate(columns)}
    scores["map_average"] = map_average(maps_of, truths, folds, base, grid)
    scores["box_vote"] = box_vote(maps_of, truths, folds, tunings, k, iou_threshold)
    return scores


def fold_vote(fold_maps: Sequence[np.ndarray], truth: TextRegions, settings: PostprocessSettings, k: int,
              iou_threshold: float = 0.5) -> DetectionCounts:  # fmt: skip
    """One holdout image's counts when its K fold models vote (>= k of K) at `settings` (the column's final
    tuned settings): the practitioners' "Voting >= 3" of 5."""
    members = [boxes_from_map(m, settings) for m in fold_maps]
    return count_matches(truth, vote_boxes(members, k, iou_threshold))
