"""Synthetic segmentation data (`distrain data synth-shapes --out DIR --images N`): filled circles, rectangles and
triangles of random colours on textured backgrounds, with the class-id mask of each image (0 background,
1 circle, 2 rectangle, 3 triangle; a later shape covers an earlier one in the image and in the mask alike).
Written as `images/<name>.png` and `masks/<name>.png`, the layout `distrain data pack --masks` reads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPE_CLASSES = ["background", "circle", "rectangle", "triangle"]


def draw_shapes(rng: np.random.Generator, size: tuple[int, int] = (96, 96)) -> tuple[Image.Image, Image.Image]:
    """One RGB image and its mask ("L", class ids)."""
    width, height = size
    background = rng.integers(60, 200, size=3) + rng.normal(0, 18, size=(height, width, 3))
    image = Image.fromarray(np.clip(background, 0, 255).astype(np.uint8))
    mask = Image.new("L", size, 0)
    draw_image, draw_mask = ImageDraw.Draw(image), ImageDraw.Draw(mask)
    for _ in range(int(rng.integers(1, 5))):
        cls = int(rng.integers(1, len(SHAPE_CLASSES)))
        cx, cy = rng.uniform(0.15, 0.85) * width, rng.uniform(0.15, 0.85) * height
        r = rng.uniform(0.08, 0.25) * min(width, height)
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        if cls == 1:
            box = [(cx - r, cy - r), (cx + r, cy + r)]
            draw_image.ellipse(box, fill=colour), draw_mask.ellipse(box, fill=cls)
        elif cls == 2:
            box = [(cx - r, cy - 0.6 * r), (cx + r, cy + 0.6 * r)]
            draw_image.rectangle(box, fill=colour), draw_mask.rectangle(box, fill=cls)
        else:
            turn = rng.uniform(0, 2 * np.pi)
            corners = [(cx + r * np.cos(turn + a), cy + r * np.sin(turn + a)) for a in (0, 2.094, 4.189)]
            draw_image.polygon(corners, fill=colour), draw_mask.polygon(corners, fill=cls)
    return image, mask


def write_synth_shapes(out_dir: str | Path, n_images: int, seed: int = 0, size: tuple[int, int] = (96, 96)) -> Path:
    """Write `n_images` images and masks under out_dir; image i depends only on (seed, i). Returns out_dir."""
    out = Path(out_dir)
    for sub in ("images", "masks"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n_images):
        image, mask = draw_shapes(np.random.default_rng([seed, i]), size)
        image.save(out / "images" / f"shapes-{i:05d}.png")
        mask.save(out / "masks" / f"shapes-{i:05d}.png")
    return out


SOURCE_IMAGES = 240
"""Images of the `data.source: synth_shapes` demo (seed 0; a fifth held out)."""


def ensure_synth_shapes(out_dir: str | Path, images: int = SOURCE_IMAGES) -> None:
    """Pack `images` generated shape images with their masks (seed 0, 20% holdout) into `out_dir` unless a complete
    copy is there; as `ensure_digits`, safe when several processes start together on one disk."""
    import tempfile

    from distrain.data.index import INDEX_NAME
    from distrain.data.masks import samples_from_masks
    from distrain.data.pack import write_dataset
    from distrain.errors import DataError

    out = Path(out_dir)
    if (out / INDEX_NAME).exists():
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as raw:
        write_synth_shapes(raw, images)
        samples, classes = samples_from_masks(Path(raw) / "images", Path(raw) / "masks", SHAPE_CLASSES)
        try:
            write_dataset(samples, out, classes=classes, test_fraction=0.2)
        except DataError:
            if not (out / INDEX_NAME).exists():  # not a lost race: a directory without an index is in the way
                raise
