"""Geometric augmentation moves polygons with the pixels: a polygon's warped points equal the contour of its
warped mask within a pixel; cropped words are clipped and become don't-care when mostly cut."""

import numpy as np
import pytest

from distrain.tasks.detection.augment import GeometricSettings, augment, clip_regions, fit_canvas, scaled
from distrain.tasks.detection.geometry import TextRegions

WORD = np.array([[40, 50], [150, 42], [154, 80], [44, 88]], dtype=float)  # a slanted quadrilateral


@pytest.mark.parametrize("seed", range(8))
def test_the_warped_polygon_is_the_warped_masks_contour_within_a_pixel(seed):
    import cv2
    import shapely

    image = np.zeros((120, 200, 3), np.uint8)
    mask = np.zeros((120, 200), np.uint8)
    cv2.fillPoly(mask, [np.round(WORD).astype(np.int32)], 1)
    settings = GeometricSettings(scale=(0.8, 1.4), max_rotation=15, flip=0.5)
    _, regions, warped = augment(np.random.default_rng(seed), image, TextRegions([WORD]), (160, 128), settings,
                                 mask=mask)  # fmt: skip
    contours, _ = cv2.findContours(warped, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    if not contours:  # the word was cropped away entirely
        assert len(regions) == 0
        return
    outline = max(contours, key=cv2.contourArea).reshape(-1, 2).astype(float)
    polygon = regions.polygons[0]
    touches_edge = polygon.min() <= 0.5 or polygon[:, 0].max() >= 159.5 or polygon[:, 1].max() >= 127.5
    distance = shapely.hausdorff_distance(shapely.Polygon(polygon).exterior, shapely.Polygon(outline).exterior)
    # contour points are the centres of the mask's boundary pixels: within a pixel (and a half where the crop
    # edge runs along the last pixel row, whose centre is 0.5 px inside the frame)
    assert distance <= (1.5 if touches_edge else 1.0), (seed, distance)


def test_a_word_mostly_cropped_away_becomes_dont_care_and_one_fully_outside_is_dropped():
    regions = TextRegions([np.array([[-30, 0], [10, 0], [10, 10], [-30, 10]], float),  # 25 % visible
                           np.array([[-5, 20], [35, 20], [35, 30], [-5, 30]], float),  # 87.5 % visible
                           np.array([[-50, 0], [-10, 0], [-10, 10], [-50, 10]], float)])  # fmt: skip
    clipped = clip_regions(regions, 64, 64, min_visible=0.5)
    assert len(clipped) == 2 and clipped.ignore.tolist() == [True, False]
    assert clipped.polygons[1][:, 0].min() == 0


def test_fit_canvas_keeps_the_aspect_and_polygons_scale_back():
    image = np.full((300, 200, 3), 7, np.uint8)
    canvas, scale = fit_canvas(image, 160)
    assert canvas.shape == (160, 160, 3) and scale == pytest.approx(160 / 300)
    assert (canvas[:, :107] == 7).all() and (canvas[:, 107:] == 0).all()  # 200 x 160 / 300 = 106.7 -> 107 columns
    back = scaled(scaled(TextRegions([WORD]), scale), 1 / scale)
    np.testing.assert_allclose(back.polygons[0], WORD)
