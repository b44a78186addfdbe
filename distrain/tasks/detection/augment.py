"""Geometric augmentation that moves text polygons and masks with the image: one random affine map (scale,
rotation, optional horizontal flip, and a crop to the output size) applied to the pixels with OpenCV and to the
polygons' points by the same matrix, so that the two cannot disagree. Words cut by the crop are clipped to it;
a word with less than `min_visible` of its area left becomes don't-care (neither text nor background), one with
nothing left is dropped. Photometric augmentation (colour jitter, blur) does not move anything and is left to
the image transforms classification uses.

For evaluation, `fit_canvas` scales an image onto a square canvas without cropping; `scaled` maps polygons
between the two."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from distrain.tasks.detection.geometry import TextRegions, polygon_area


@dataclass(frozen=True)
class GeometricSettings:
    """Random scale (times the scale that fits the whole image in the output), rotation (degrees, either way),
    horizontal flip probability (0 for text by default: mirrored words are not text), and the visible fraction
    below which a cropped word becomes don't-care."""

    scale: tuple[float, float] = (0.7, 1.6)
    max_rotation: float = 10.0
    flip: float = 0.0
    min_visible: float = 0.5


def random_affine(rng: np.random.Generator, in_size: tuple[int, int], out_size: tuple[int, int],
                  settings: GeometricSettings) -> np.ndarray:  # fmt: skip
    """A 2x3 matrix mapping input pixels (x, y) to output pixels: the image scaled, rotated and maybe flipped
    about its centre, then shifted so that a random window of it fills the output (centred when it is smaller)."""
    (in_w, in_h), (out_w, out_h) = in_size, out_size
    scale = min(out_w / in_w, out_h / in_h) * rng.uniform(*settings.scale)
    angle = np.deg2rad(rng.uniform(-settings.max_rotation, settings.max_rotation))
    flip = -1.0 if rng.random() < settings.flip else 1.0
    cos, sin = np.cos(angle) * scale, np.sin(angle) * scale
    linear = np.array([[cos * flip, sin], [-sin * flip, cos]])
    corners = (np.array([[0, 0], [in_w, 0], [in_w, in_h], [0, in_h]]) - [in_w / 2, in_h / 2]) @ linear.T
    span = corners.max(axis=0) - corners.min(axis=0)  # the transformed image's bounding box
    slack = np.maximum(span - [out_w, out_h], 0) / 2  # how far the window may move from the centre, each way
    shift = np.array([out_w / 2, out_h / 2]) + rng.uniform(-slack, slack)
    offset = shift - linear @ np.array([in_w / 2, in_h / 2])
    return np.hstack([linear, offset[:, None]])


def warp_points(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Points [K, 2] through a 2x3 affine matrix."""
    return points @ matrix[:, :2].T + matrix[:, 2]


def clip_regions(regions: TextRegions, width: int, height: int, min_visible: float) -> TextRegions:
    """Polygons clipped to the width x height image; a word with less than `min_visible` of its area inside
    becomes don't-care, one with none is dropped. A clipped polygon keeps its outline's points (its largest
    piece's exterior)."""
    import shapely

    frame = shapely.box(0, 0, width, height)
    kept, ignore, scores = [], [], []
    for polygon, ignored, score in zip(regions.polygons, regions.ignore, regions.scores):
        area = polygon_area(polygon)
        if polygon.min() >= 0 and polygon[:, 0].max() <= width and polygon[:, 1].max() <= height:
            kept.append(polygon), ignore.append(ignored), scores.append(score)
            continue
        inside = shapely.intersection(shapely.make_valid(shapely.Polygon(polygon)), frame)
        pieces = [g for g in getattr(inside, "geoms", [inside]) if g.geom_type == "Polygon" and g.area > 0]
        if not pieces:
            continue
        piece = max(pieces, key=lambda g: g.area)
        kept.append(np.asarray(piece.exterior.coords)[:-1])
        ignore.append(ignored or piece.area < min_visible * area)
        scores.append(score)
    return TextRegions(kept, ignore=np.asarray(ignore, bool), scores=np.asarray(scores, np.float32))


def augment(
    rng: np.random.Generator,
    image: np.ndarray,
    regions: TextRegions,
    out_size: tuple[int, int],
    settings: GeometricSettings = GeometricSettings(),
    mask: np.ndarray | None = None,
) -> tuple[np.ndarray, TextRegions, np.ndarray | None]:
    """One random geometric augmentation of an image [H, W(, C)] uint8, its text regions and (segmentation) its
    class-id mask [H, W], to out_size = (width, height). Pixels: bilinear; the mask: nearest, 0 outside."""
    import cv2

    matrix = random_affine(rng, (image.shape[1], image.shape[0]), out_size, settings)
    warped = cv2.warpAffine(image, matrix, out_size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
    moved = TextRegions([warp_points(p, matrix) for p in regions.polygons], ignore=regions.ignore,
                        scores=regions.scores)  # fmt: skip
    warped_mask = None
    if mask is not None:
        warped_mask = cv2.warpAffine(mask, matrix, out_size, flags=cv2.INTER_NEAREST, borderValue=0)
    return warped, clip_regions(moved, *out_size, settings.min_visible), warped_mask


def fit_canvas(image: np.ndarray, size: int) -> tuple[np.ndarray, float]:
    """The image scaled so its longer side is `size`, on a size x size zero canvas (top left), and the scale
    (canvas pixels = image pixels x scale): every image of an evaluation then gives a map of one shape."""
    import cv2

    height, width = image.shape[:2]
    scale = size / max(height, width)
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    canvas = np.zeros((size, size) + image.shape[2:], image.dtype)
    canvas[:new_h, :new_w] = cv2.resize(image, (new_w, new_h),
                                        interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)  # fmt: skip
    return canvas, scale


def scaled(regions: TextRegions, factor: float) -> TextRegions:
    """Polygons scaled by `factor` (image -> canvas pixels, or back with 1 / scale)."""
    return TextRegions([p * factor for p in regions.polygons], ignore=regions.ignore, scores=regions.scores)
