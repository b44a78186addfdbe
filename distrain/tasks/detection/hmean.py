"""H-mean of text detection by the ICDAR 2015 protocol: detections and ground-truth words matched one to one
at IoU > 0.5 (strictly, as the competition's script), don't-care words left out of recall, and detections lying
mostly (> 50 % of their area) inside a don't-care word left out of precision. Counts are summed over the images
before the ratios, as the competition's script does."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from distrain.tasks.detection.geometry import TextRegions, iou_matrix, polygon_area

IOU_MATCH = 0.5
DONT_CARE_OVERLAP = 0.5


@dataclass(frozen=True)
class DetectionCounts:
    """Matched pairs, scored ground-truth words and scored detections: sums over images add up."""

    matched: int = 0
    words: int = 0
    detections: int = 0

    def __add__(self, other: DetectionCounts) -> DetectionCounts:
        return DetectionCounts(self.matched + other.matched, self.words + other.words,
                               self.detections + other.detections)  # fmt: skip

    @property
    def precision(self) -> float:
        return self.matched / self.detections if self.detections else 0.0

    @property
    def recall(self) -> float:
        return self.matched / self.words if self.words else 0.0

    @property
    def hmean(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0


def count_matches(truth: TextRegions, detected: TextRegions, iou_match: float = IOU_MATCH) -> DetectionCounts:
    """One image's counts. Matching is greedy in (word, detection) order, each used once, as in ICDAR's
    script: a word split into two halves (IoU 0.5 each), or two words merged into one box, match nothing."""
    iou, inter = iou_matrix(truth.polygons, detected.polygons)
    dont_care = np.flatnonzero(truth.ignore)
    scored_det = np.ones(len(detected), bool)
    if len(dont_care) and len(detected):
        det_area = np.array([polygon_area(p) for p in detected.polygons])
        inside = inter[dont_care].max(axis=0) / np.maximum(det_area, 1e-12)
        scored_det = inside <= DONT_CARE_OVERLAP
    word_used, det_used, matched = np.zeros(len(truth), bool), np.zeros(len(detected), bool), 0
    for w in np.flatnonzero(~truth.ignore):
        for d in np.flatnonzero(scored_det & ~det_used):
            if iou[w, d] > iou_match and not word_used[w]:
                word_used[w] = det_used[d] = True
                matched += 1
                break
    return DetectionCounts(matched, int((~truth.ignore).sum()), int(scored_det.sum()))


def hmean_counts(truths: list[TextRegions], detections: list[TextRegions]) -> DetectionCounts:
    """The summed counts over images (pairs of ground truth and detections, in the same order)."""
    if len(truths) != len(detections):
        raise ValueError(f"{len(truths)} images of ground truth but {len(detections)} of detections")
    total = DetectionCounts()
    for truth, detected in zip(truths, detections):
        total = total + count_matches(truth, detected)
    return total
