"""DB training targets of one image, as in the DBNet paper (Liao et al., 2020, section 3.3) and MMOCR's
`DBModuleLoss` targets: each text polygon shrunk by D = A (1 - r^2) / L (area A, perimeter L, r = 0.4) is the
probability map's kernel; the band between the polygon shrunk and grown by D holds the threshold map, 1 - d / D
for a pixel's distance d to the polygon's border, scaled to [thresh_min, thresh_max].

Pixel (row i, column j) is the point (x=j, y=i), the convention of `cv2.fillPoly`. Don't-care polygons, and
polygons too small or too thin to shrink, are masked out of the probability-map loss rather than learned as
background."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from distrain.tasks.detection.geometry import TextRegions, polygon_area

SHRINK_RATIO = 0.4
THRESH_MIN, THRESH_MAX = 0.3, 0.7
MIN_TEXT_SIZE = 8
"""Polygons whose shorter bounding-box side is below this (pixels) are masked out, as in MMOCR."""


@dataclass
class DBTargets:
    """[H, W] float32 maps: the shrunk kernels (1 inside), the probability loss's mask (0 on don't-care and
    unshrinkable text), the threshold map, and its loss's mask (1 in every grown polygon)."""

    shrink_map: np.ndarray
    shrink_mask: np.ndarray
    thresh_map: np.ndarray
    thresh_mask: np.ndarray

    def stacked(self) -> np.ndarray:
        """The four maps as one [4, H, W] array (the order above)."""
        return np.stack([self.shrink_map, self.shrink_mask, self.thresh_map, self.thresh_mask])


def offset_distance(polygon: np.ndarray, ratio: float) -> float:
    """D = A (1 - ratio^2) / L: how far DB shrinks a polygon (ratio 0.4) or unclips a kernel (see postprocess)."""
    perimeter = float(np.linalg.norm(polygon - np.roll(polygon, -1, axis=0), axis=1).sum())
    return polygon_area(polygon) * (1 - ratio**2) / perimeter if perimeter > 0 else 0.0


def offset_polygon(polygon: np.ndarray, distance: float) -> list[np.ndarray]:
    """The polygon grown (distance > 0) or shrunk (< 0) by `distance` pixels with pyclipper (rounded joins);
    shrinking may split it in pieces or leave nothing."""
    import pyclipper

    offset = pyclipper.PyclipperOffset()
    offset.AddPath(np.round(polygon).astype(np.int64).tolist(), pyclipper.JT_ROUND, pyclipper.ET_CLOSEDPOLYGON)
    return [np.asarray(p, dtype=np.float64) for p in offset.Execute(distance) if len(p) >= 3]


def distance_to_border(xs: np.ndarray, ys: np.ndarray, polygon: np.ndarray) -> np.ndarray:
    """The exact distance of each point (xs[i, j], ys[i, j]) to the polygon's nearest edge segment."""
    best = np.full(xs.shape, np.inf)
    for a, b in zip(polygon, np.roll(polygon, -1, axis=0)):
        edge = b - a
        length2 = float(edge @ edge) or 1e-12
        t = np.clip(((xs - a[0]) * edge[0] + (ys - a[1]) * edge[1]) / length2, 0.0, 1.0)
        best = np.minimum(best, np.hypot(xs - (a[0] + t * edge[0]), ys - (a[1] + t * edge[1])))
    return best


def db_targets(
    regions: TextRegions,
    height: int,
    width: int,
    shrink_ratio: float = SHRINK_RATIO,
    thresh_min: float = THRESH_MIN,
    thresh_max: float = THRESH_MAX,
    min_text_size: float = MIN_TEXT_SIZE,
) -> DBTargets:
    """The DB targets of an image's text regions at height x width (the polygons in that image's pixels)."""
    import cv2

    shrink_map = np.zeros((height, width), np.float32)
    shrink_mask = np.ones((height, width), np.float32)
    border = np.zeros((height, width), np.float32)  # 1 - d / D, the largest over overlapping polygons
    thresh_mask = np.zeros((height, width), np.float32)
    for polygon, ignore in zip(regions.polygons, regions.ignore):
        size = min(np.ptp(polygon[:, 0]), np.ptp(polygon[:, 1]))
        distance = offset_distance(polygon, shrink_ratio)
        kernels = offset_polygon(polygon, -distance) if not ignore and size >= min_text_size else []
        if not kernels:  # don't-care, too small, or shrunk to nothing: neither text nor background
            cv2.fillPoly(shrink_mask, [np.round(polygon).astype(np.int32)], 0.0)
            continue
        cv2.fillPoly(shrink_map, [np.round(k).astype(np.int32) for k in kernels], 1.0)
        _draw_border(polygon, distance, border, thresh_mask)
    thresh_map = border * (thresh_max - thresh_min) + thresh_min
    return DBTargets(shrink_map, shrink_mask, thresh_map.astype(np.float32), thresh_mask)


def _draw_border(polygon: np.ndarray, distance: float, border: np.ndarray, thresh_mask: np.ndarray) -> None:
    """Raise `border` to 1 - d / D (clipped to [0, 1]) over the polygon grown by D, and mark that region."""
    import cv2

    grown = offset_polygon(polygon, distance)
    if not grown or distance <= 0:
        return
    cv2.fillPoly(thresh_mask, [np.round(g).astype(np.int32) for g in grown], 1.0)
    height, width = border.shape
    points = np.concatenate(grown)
    x0, y0 = np.clip(np.floor(points.min(axis=0)).astype(int), 0, [width - 1, height - 1])
    x1, y1 = np.clip(np.ceil(points.max(axis=0)).astype(int), 0, [width - 1, height - 1])
    ys, xs = np.mgrid[y0 : y1 + 1, x0 : x1 + 1].astype(np.float64)
    value = 1.0 - np.clip(distance_to_border(xs, ys, polygon) / distance, 0.0, 1.0)
    np.maximum(border[y0 : y1 + 1, x0 : x1 + 1], value, out=border[y0 : y1 + 1, x0 : x1 + 1])
