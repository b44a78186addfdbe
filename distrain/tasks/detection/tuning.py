"""DB post-processing tuned on out-of-fold probability maps with fold honesty: the settings applied to fold k's
maps are the ones with the best H-mean on the other folds' maps, so fold k's labels never choose what fold k is
scored with (as distrain tunes a binary task's threshold). The settings kept for serving are the best over all
folds. Reported: the CV H-mean at the default settings and tuned (honest), and each fold's choice.

Every (setting, image) pair is post-processed and counted once; a fold's choice then only sums counts."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace

import numpy as np

from distrain.tasks.detection.geometry import TextRegions
from distrain.tasks.detection.hmean import count_matches
from distrain.tasks.detection.postprocess import PostprocessSettings, boxes_from_map

DEFAULT_GRID = {
    "thresh": (0.2, 0.25, 0.3, 0.35, 0.4),
    "box_thresh": (0.3, 0.4, 0.5, 0.6, 0.7),
    "unclip_ratio": (1.3, 1.5, 1.8, 2.1),
}
"""Around MMOCR's defaults (0.3 / 0.6 / 1.5) and the practitioners' tuned values (0.28 / 0.25)."""


@dataclass(frozen=True)
class TunedPostprocess:
    """What tuning chose and how it scored."""

    per_fold: dict[int, PostprocessSettings]
    final: PostprocessSettings
    cv_default: float
    cv_tuned: float

    def as_dict(self) -> dict:
        return {"per_fold": {str(k): s.as_dict() for k, s in self.per_fold.items()}, "final": self.final.as_dict(),
                "cv_default": self.cv_default, "cv_tuned": self.cv_tuned}  # fmt: skip


def grid_settings(base: PostprocessSettings, grid: dict[str, tuple]) -> list[PostprocessSettings]:
    """Every combination of the grid's values, the rest of `base` kept; `base` itself first."""
    combos = [replace(base, **dict(zip(grid, values))) for values in itertools.product(*grid.values())]
    return [base] + [c for c in combos if c != base]


def image_counts(prob: np.ndarray, truth: TextRegions, settings: list[PostprocessSettings],
                 scale: tuple[float, float] = (1.0, 1.0)) -> np.ndarray:  # fmt: skip
    """[len(settings), 3] counts (matched, words, detections) of one image's map at every setting."""
    rows = []
    for setting in settings:
        c = count_matches(truth, boxes_from_map(prob, setting, scale))
        rows.append((c.matched, c.words, c.detections))
    return np.asarray(rows, np.int64)


def count_table(
    maps: list[np.ndarray], truths: list[TextRegions], settings: list[PostprocessSettings],
    scale: list[tuple[float, float]] | None = None,
) -> np.ndarray:  # fmt: skip
    """[len(settings), len(maps), 3] int counts (matched, words, detections) of every setting on every image."""
    columns = [image_counts(prob, truth, settings, scale[j] if scale else (1.0, 1.0))
               for j, (prob, truth) in enumerate(zip(maps, truths))]  # fmt: skip
    return np.stack(columns, axis=1) if columns else np.zeros((len(settings), 0, 3), np.int64)


def hmean_of(counts: np.ndarray) -> np.ndarray:
    """H-mean per row of summed (matched, words, detections) counts [..., 3]."""
    matched, words, detections = (counts[..., i].astype(np.float64) for i in range(3))
    precision = np.divide(matched, detections, out=np.zeros_like(matched), where=detections > 0)
    recall = np.divide(matched, words, out=np.zeros_like(matched), where=words > 0)
    total = precision + recall
    return np.divide(2 * precision * recall, total, out=np.zeros_like(total), where=total > 0)


def tune_postprocess(
    maps: list[np.ndarray], truths: list[TextRegions], folds: np.ndarray,
    base: PostprocessSettings = PostprocessSettings(), grid: dict[str, tuple] = DEFAULT_GRID,
    scale: list[tuple[float, float]] | None = None,
) -> TunedPostprocess:  # fmt: skip
    """Tune on OOF maps (one per CV image, `folds[j]` the fold that held image j out). Ties go to the earlier
    setting in the grid (the default first)."""
    settings = grid_settings(base, grid)
    return choose_settings(count_table(maps, truths, settings, scale), folds, settings)


def choose_settings(table: np.ndarray, folds: np.ndarray, settings: list[PostprocessSettings]) -> TunedPostprocess:
    """The fold-honest choice from a `count_table` over `settings` (the default first): fold k's settings score
    best on the other folds' images; the final ones on all of them."""
    folds = np.asarray(folds)
    honest = np.zeros(3, np.int64)
    per_fold = {}
    for k in np.unique(folds).tolist():
        held = folds == k
        choice = int(np.argmax(hmean_of(table[:, ~held].sum(axis=1))))  # the other folds' images only
        per_fold[int(k)] = settings[choice]
        honest += table[choice, held].sum(axis=0)
    final = settings[int(np.argmax(hmean_of(table.sum(axis=1))))]
    return TunedPostprocess(per_fold, final, float(hmean_of(table[0].sum(axis=0))), float(hmean_of(honest)))
