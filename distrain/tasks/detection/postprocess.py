"""Probability map -> scored text boxes, as DBNet's post-processing (MMOCR `DBPostprocessor`, PaddleOCR
`DBPostProcess`): binarise at `thresh`, take the contours (OpenCV), score each by the mean probability inside,
drop those below `box_thresh`, grow each kernel back by D' = A * unclip_ratio / L (pyclipper) and keep its
minimum-area rectangle, at most `max_candidates` contours per image.

The boxes are 4-point rotated rectangles (clockwise from the top-left corner), in the input image's pixels: the
map may be smaller (a network's output stride) and is scaled back by `scale`."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from distrain.tasks.detection.geometry import TextRegions, polygon_area
from distrain.tasks.detection.targets import offset_polygon


@dataclass(frozen=True)
class PostprocessSettings:
    """DB post-processing parameters (the ones tuned on OOF predictions are thresh, box_thresh, unclip_ratio).
    Defaults: MMOCR's DBNet. The practitioners' EfficientNet-B4 receipts model used thresh 0.28,
    box_thresh 0.25, max_candidates 600."""

    thresh: float = 0.3
    box_thresh: float = 0.6
    unclip_ratio: float = 1.5
    max_candidates: int = 1000
    min_size: float = 3.0
    """Boxes whose shorter side is below this many map pixels are dropped (before and after unclipping)."""

    def as_dict(self) -> dict:
        return asdict(self)


def ordered_corners(rect) -> np.ndarray:
    """`cv2.minAreaRect`'s rectangle as [4, 2] corners, clockwise from the one nearest the top-left."""
    import cv2

    corners = cv2.boxPoints(rect).astype(np.float64)
    centre = corners.mean(axis=0)
    angles = np.arctan2(corners[:, 1] - centre[1], corners[:, 0] - centre[0])
    corners = corners[np.argsort(angles)]  # clockwise in image coordinates (y down)
    start = int(np.argmin(corners.sum(axis=1)))
    return np.roll(corners, -start, axis=0)


def box_score(prob: np.ndarray, contour: np.ndarray) -> float:
    """The mean probability inside a contour (MMOCR's "fast" score: the contour's own pixels, not its box)."""
    import cv2

    x0, y0 = np.floor(contour.min(axis=0)).astype(int)
    x1, y1 = np.ceil(contour.max(axis=0)).astype(int)
    height, width = prob.shape
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, width - 1), min(y1, height - 1)
    mask = np.zeros((y1 - y0 + 1, x1 - x0 + 1), np.uint8)
    cv2.fillPoly(mask, [np.round(contour - [x0, y0]).astype(np.int32)], 1)
    inside = prob[y0 : y1 + 1, x0 : x1 + 1][mask.astype(bool)]
    return float(inside.mean()) if inside.size else 0.0


def unclip(polygon: np.ndarray, unclip_ratio: float) -> np.ndarray | None:
    """The kernel grown by D' = A * unclip_ratio / L; the largest piece (None if nothing is left)."""
    perimeter = float(np.linalg.norm(polygon - np.roll(polygon, -1, axis=0), axis=1).sum())
    if perimeter <= 0:
        return None
    pieces = offset_polygon(polygon, polygon_area(polygon) * unclip_ratio / perimeter)
    return max(pieces, key=polygon_area) if pieces else None


def boxes_from_map(prob: np.ndarray, settings: PostprocessSettings, scale: tuple[float, float] = (1.0, 1.0)):
    """The text boxes of one probability map [h, w] as TextRegions (scores: the mean probability inside).
    `scale` = (sx, sy) maps map pixels to image pixels."""
    import cv2

    binary = (prob > settings.thresh).astype(np.uint8)
    contours, _ = cv2.findContours(binary, cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
    polygons, scores = [], []
    for contour in contours[: settings.max_candidates]:
        points = contour.reshape(-1, 2).astype(np.float64)
        if len(points) < 3 or min(cv2.minAreaRect(points.astype(np.float32))[1]) < settings.min_size:
            continue
        score = box_score(prob, points)
        if score < settings.box_thresh:
            continue
        grown = unclip(points, settings.unclip_ratio)
        if grown is None:
            continue
        rect = cv2.minAreaRect(grown.astype(np.float32))
        if min(rect[1]) < settings.min_size + 2:
            continue
        polygons.append(ordered_corners(rect) * np.asarray(scale, dtype=np.float64))
        scores.append(score)
    return TextRegions(polygons, scores=np.asarray(scores, np.float32))
