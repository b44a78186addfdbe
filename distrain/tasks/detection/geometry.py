"""Polygons of one image as arrays, their checks, and pairwise intersection-over-union.

A polygon is a float array [K, 2] of (x, y) pixel coordinates, K >= 3, in drawing order. An image's ground
truth is a list of polygons with an `ignore` flag each (ICDAR's "###" don't-care regions)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class TextRegions:
    """The text polygons of one image; `ignore[i]` marks a don't-care region (scored by neither precision nor
    recall); `scores[i]` is a detection's confidence (1 for ground truth)."""

    polygons: list[np.ndarray] = field(default_factory=list)
    ignore: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    scores: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))

    def __post_init__(self):
        self.polygons = [np.asarray(p, dtype=np.float64).reshape(-1, 2) for p in self.polygons]
        n = len(self.polygons)
        self.ignore = np.zeros(n, bool) if len(self.ignore) == 0 and n else np.asarray(self.ignore, bool)
        self.scores = np.ones(n, np.float32) if len(self.scores) == 0 and n else np.asarray(self.scores, np.float32)
        if not len(self.ignore) == len(self.scores) == n:
            raise ValueError(f"{n} polygons but {len(self.ignore)} ignore flags and {len(self.scores)} scores")

    def __len__(self) -> int:
        return len(self.polygons)

    @classmethod
    def from_json(cls, annotation: bytes | str) -> TextRegions:
        """The words of a packed detection sample (`{"words": [{"points", "text", "ignore"}]}`)."""
        import json

        words = json.loads(annotation)["words"]
        return cls([w["points"] for w in words], ignore=np.array([bool(w["ignore"]) for w in words], bool))


def polygon_problem(polygon: np.ndarray, width: int, height: int) -> str | None:
    """Why `polygon` cannot be a text region of a width × height image, or None: fewer than 3 points,
    non-finite coordinates, points outside the image (a pixel of slack for rounding), or no area."""
    points = np.asarray(polygon, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 2 or len(points) < 3:
        return f"a polygon needs at least 3 (x, y) points, got {points.reshape(-1).size // 2 if points.size else 0}"
    if not np.isfinite(points).all():
        return "a polygon has non-finite coordinates"
    x, y = points[:, 0], points[:, 1]
    if x.min() < -1 or y.min() < -1 or x.max() > width + 1 or y.max() > height + 1:
        span = f"x {x.min():g}..{x.max():g}, y {y.min():g}..{y.max():g}"
        return f"a polygon lies outside the {width}x{height} image ({span})"
    if polygon_area(points) <= 0:
        return "a polygon has no area"
    return None


def polygon_area(points: np.ndarray) -> float:
    """The area of a simple polygon (shoelace formula), whatever its orientation."""
    x, y = points[:, 0], points[:, 1]
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2)


def _shapes(polygons: list[np.ndarray]):
    import shapely

    shapes = shapely.polygons([np.asarray(p, dtype=np.float64) for p in polygons])
    # a self-intersecting prediction (a twisted quadrilateral) is repaired rather than scored as empty
    return shapely.make_valid(shapes) if len(shapes) and not shapely.is_valid(shapes).all() else shapes


def _boxes(polygons: list[np.ndarray]) -> np.ndarray:
    return np.array([[p[:, 0].min(), p[:, 1].min(), p[:, 0].max(), p[:, 1].max()] for p in polygons])


def _intersections(a: list[np.ndarray], b: list[np.ndarray], shapes_a, shapes_b) -> np.ndarray:
    """Pairwise intersection areas [len(a), len(b)] of two non-empty lists and their shapely shapes. Only pairs
    whose bounding boxes overlap are intersected (at 600 candidates x 100 words per image, most are far apart)."""
    import shapely

    box_a, box_b = _boxes(a), _boxes(b)
    near = ((box_a[:, None, 0] < box_b[None, :, 2]) & (box_b[None, :, 0] < box_a[:, None, 2])
            & (box_a[:, None, 1] < box_b[None, :, 3]) & (box_b[None, :, 1] < box_a[:, None, 3]))  # fmt: skip
    out = np.zeros((len(a), len(b)))
    i, j = np.nonzero(near)
    if len(i):
        out[i, j] = shapely.area(shapely.intersection(shapes_a[i], shapes_b[j]))
    return out


def iou_matrix(a: list[np.ndarray], b: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(IoU [len(a), len(b)], intersection areas) of two lists of polygons."""
    import shapely

    if not len(a) or not len(b):
        empty = np.zeros((len(a), len(b)))
        return empty, empty.copy()
    shapes_a, shapes_b = _shapes(a), _shapes(b)  # built once: making them valid is the costly part
    inter = _intersections(a, b, shapes_a, shapes_b)
    union = shapely.area(shapes_a)[:, None] + shapely.area(shapes_b)[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0), inter
