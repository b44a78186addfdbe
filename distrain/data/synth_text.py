"""Synthetic receipts with ground-truth word polygons (`distrain data synth-text`): no text data set can be
downloaded here, so the text-detection configs train on these.

Each receipt is a paper-like page (off-white, a brightness gradient, grain, a few smudges) with lines of
receipt words (items, prices, totals, dates) in Pillow's bundled font at varied sizes, each line slightly
rotated. A word's polygon is its ink box (the font's bounding box of the string) carried through the same
rotation as its pixels, so it is exact, not estimated. A few words are printed faint and marked don't-care
(`ignore: true`), as ICDAR marks illegible text "###".

The output is ICDAR-style: `images/<name>.jpg` and one `annotations.json`
`{"images": [{"file", "width", "height", "words": [{"points": [[x, y] x 4], "text", "ignore"}]}]}`,
written image by image (memory does not grow with N)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from distrain.errors import DataError

ANNOTATIONS = "annotations.json"
ITEMS = ("MILK", "BREAD", "EGGS", "COFFEE", "TEA", "RICE", "APPLES", "CHEESE", "BUTTER", "WATER", "SOAP",
         "PASTA", "SUGAR", "SALT", "JUICE", "OIL", "BEANS", "FLOUR", "HONEY", "NOODLES")  # fmt: skip
HEADERS = ("TOTAL", "SUBTOTAL", "TAX", "CASH", "CHANGE", "CARD", "VISA", "RECEIPT", "STORE", "THANK", "YOU")


@dataclass(frozen=True)
class ReceiptStyle:
    """The ranges receipts are drawn from (pixels and degrees)."""

    width: tuple[int, int] = (240, 360)
    height: tuple[int, int] = (300, 440)
    font_size: tuple[int, int] = (14, 26)
    max_rotation: float = 4.0
    faint_fraction: float = 0.05
    """Words printed faint and marked don't-care."""


def receipt_lines(rng: np.random.Generator) -> list[list[str]]:
    """The words of one receipt, line by line: a header, items with prices, totals, a date."""
    lines = [[str(rng.choice(["STORE", "RECEIPT", "MARKET"])), f"#{rng.integers(100, 9999)}"]]
    for _ in range(int(rng.integers(3, 9))):
        lines.append([str(rng.choice(ITEMS)), f"{rng.integers(1, 99)}.{rng.integers(0, 99):02d}"])
    lines.append([str(rng.choice(["TOTAL", "SUBTOTAL"])), f"{rng.integers(10, 999)}.{rng.integers(0, 99):02d}"])
    lines.append([f"{rng.integers(1, 28):02d}/{rng.integers(1, 12):02d}/20{rng.integers(10, 30)}",
                  f"{rng.integers(0, 23):02d}:{rng.integers(0, 59):02d}"])  # fmt: skip
    return lines


def paper(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """An off-white page with a brightness gradient, grain and a few smudges (RGB)."""
    base = rng.uniform(215, 250, size=3)
    ramp = np.linspace(-rng.uniform(0, 25), rng.uniform(0, 10), height)[:, None, None]
    grain = rng.normal(0, rng.uniform(2, 7), size=(height, width, 1))
    page = Image.fromarray(np.clip(base + ramp + grain, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(page)
    for _ in range(int(rng.integers(0, 4))):
        x, y, r = rng.integers(0, width), rng.integers(0, height), rng.integers(5, 30)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(int(c) for c in base * rng.uniform(0.8, 0.95)))
    return page.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.0, 0.8))))


def draw_receipt(rng: np.random.Generator, style: ReceiptStyle = ReceiptStyle()) -> tuple[Image.Image, list[dict]]:
    """One receipt image and its words ({"points", "text", "ignore"}, polygons in the image's pixels)."""
    width, height = int(rng.integers(*style.width)), int(rng.integers(*style.height))
    page = paper(rng, width, height)
    words: list[dict] = []
    y = float(rng.integers(8, 24))
    for line in receipt_lines(rng):
        size = int(rng.integers(*style.font_size))
        font = ImageFont.load_default(size=size)
        if y + 2 * size > height:
            break
        words += _draw_line(page, rng, line, font, y, style)
        y += size * float(rng.uniform(1.4, 2.0))
    return page, words


def _draw_line(page: Image.Image, rng, line: list[str], font, y: float, style: ReceiptStyle) -> list[dict]:
    """Draw one line's words on a transparent layer, rotate it about its start, paste it; the polygons follow.
    A word that would end up (partly) off the page is not drawn."""
    width, height = page.size
    layer = Image.new("L", page.size, 0)
    draw = ImageDraw.Draw(layer)
    x = float(rng.integers(6, 30))
    angle, centre = float(rng.uniform(-style.max_rotation, style.max_rotation)), (x, y)
    words = []
    for text in line:
        left, top, right, bottom = font.getbbox(text)
        box = np.array([[x + left, y + top], [x + right, y + top], [x + right, y + bottom], [x + left, y + bottom]])
        points = rotate_points(box, angle, centre)
        if points.min() < 0 or points[:, 0].max() > width - 1 or points[:, 1].max() > height - 1:
            break
        faint = bool(rng.random() < style.faint_fraction)
        draw.text((x, y), text, font=font, fill=70 if faint else 255)
        words.append({"points": np.round(points, 1).tolist(), "text": text, "ignore": faint})
        x += right + float(rng.uniform(0.6, 2.5)) * font.size
    layer = layer.rotate(angle, resample=Image.BILINEAR, center=centre)
    ink = tuple(int(c) for c in rng.integers(0, 60, size=3))
    page.paste(Image.new("RGB", page.size, ink), mask=layer)
    return words


def rotate_points(points: np.ndarray, angle_deg: float, centre) -> np.ndarray:
    """Points rotated as `Image.rotate(angle_deg, center=centre)` moves pixels (counter-clockwise on screen)."""
    a = np.deg2rad(angle_deg)
    cx, cy = centre
    dx, dy = points[:, 0] - cx, points[:, 1] - cy
    # image y points down, so a counter-clockwise turn on screen is x' = cx + dx cos a + dy sin a,
    # y' = cy - dx sin a + dy cos a
    return np.stack([cx + dx * np.cos(a) + dy * np.sin(a), cy - dx * np.sin(a) + dy * np.cos(a)], axis=1)


def write_synth_text(out_dir: str | Path, n_images: int, seed: int = 0, style: ReceiptStyle = ReceiptStyle()) -> Path:
    """Write `n_images` receipts to out_dir/images and their words to out_dir/annotations.json; returns the
    annotation file. Receipt i depends only on (seed, i)."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    entries = []
    for i in range(n_images):
        rng = np.random.default_rng([seed, i])
        image, words = draw_receipt(rng, style)
        name = f"receipt-{i:05d}.jpg"
        image.save(out / "images" / name, quality=int(rng.integers(80, 96)))
        entries.append({"file": name, "width": image.width, "height": image.height, "words": words})
    path = out / ANNOTATIONS
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"images": entries}))
    tmp.replace(path)
    return path


SOURCE_IMAGES = 240
"""Receipts of the `data.source: synth_text` demo (seed 0; a fifth held out)."""


def ensure_synth_text(out_dir: str | Path, images: int = SOURCE_IMAGES) -> None:
    """Pack `images` synthetic receipts (seed 0, 20% holdout) into `out_dir` unless a complete copy is there; as
    `ensure_digits`, safe when several processes start together on one disk."""
    import tempfile

    from distrain.data.detection import samples_from_detection
    from distrain.data.index import INDEX_NAME
    from distrain.data.pack import write_dataset

    out = Path(out_dir)
    if (out / INDEX_NAME).exists():
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as raw:
        annotations = write_synth_text(raw, images)
        samples, classes = samples_from_detection(annotations, Path(raw) / "images")
        try:
            write_dataset(samples, out, classes=classes, test_fraction=0.2)
        except DataError:
            if not (out / INDEX_NAME).exists():  # not a lost race: a directory without an index is in the way
                raise
