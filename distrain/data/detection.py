"""Text-detection samples from an ICDAR-style annotation file (`distrain data pack --detection ANN.json --images
DIR`): `{"images": [{"file", "words": [{"points": [[x, y], ...], "text", "ignore"}]}]}` (`width` / `height`
optional: read from the image's header; an optional `group`, e.g. the store a receipt came from, keeps a group's
images in one fold and out of the holdout together). Every image in DIR must be annotated (an image without words has an
entry with `"words": []`) and every entry's file must exist; a polygon with fewer than 3 points, outside its
image or without area is refused naming the image and the word. Splits stratify on the number of words
(in up to 5 buckets, quantiles of the data set's counts)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from distrain.data.pack import IMAGE_EXTENSIONS, Sample, safe_sample_id
from distrain.errors import DataError
from distrain.tasks.detection.geometry import polygon_problem

DETECTION_CLASSES = ["text"]
WORD_BUCKETS = 5


def samples_from_detection(annotations: str | Path, images: str | Path) -> tuple[list[Sample], list[str]]:
    """One sample per annotated image, its words as the sample's JSON annotation; classes: ["text"]."""
    annotations, images = Path(annotations), Path(images)
    if not annotations.is_file():
        raise DataError(f"annotation file not found: {annotations}")
    if not images.is_dir():
        raise DataError(f"image folder not found: {images}")
    on_disk = {p.relative_to(images).as_posix() for p in images.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS}
    samples, counts, named = [], [], set()
    for entry in _entries(annotations):  # streamed: memory holds one entry's words at a time, not the whole file
        name = str(entry.get("file", ""))
        path = images / name
        if name not in on_disk:
            raise DataError(f"{annotations}: image {name!r} not found in {images}")
        named.add(name)
        words = _checked_words(entry, path)
        counts.append(sum(not w["ignore"] for w in words))
        ext = path.suffix.lower().lstrip(".")
        samples.append(Sample(sample_id=safe_sample_id(str(Path(name).with_suffix(""))), label=0,
                              ext="jpg" if ext == "jpeg" else ext, path=path, group=str(entry.get("group") or ""),
                              annotation=json.dumps({"words": words}).encode()))  # fmt: skip
    unannotated = sorted(on_disk - named)
    if unannotated:
        raise DataError(f"{images / unannotated[0]}: no entry in {annotations} ({len(unannotated)} image(s) "
                        "without annotation; an image without text needs 'words': [])")  # fmt: skip
    strata = word_count_strata(np.asarray(counts))
    return [_with_stratum(s, int(k)) for s, k in zip(samples, strata)], list(DETECTION_CLASSES)


def word_count_strata(counts: np.ndarray, buckets: int = WORD_BUCKETS) -> np.ndarray:
    """Bucket of each image's word count: quantile edges over the data set (fewer buckets when counts repeat)."""
    if not len(counts):
        return counts
    edges = np.unique(np.quantile(counts, np.linspace(0, 1, buckets + 1)[1:-1]))
    return np.searchsorted(edges, counts, side="right")


def _with_stratum(sample: Sample, stratum: int) -> Sample:
    import dataclasses

    return dataclasses.replace(sample, stratum=stratum)


def _entries(annotations: Path) -> Iterator[dict]:
    """The image entries of `{"images": [...]}`, one at a time (ijson); DataError for a file of another shape."""
    import ijson

    shape = f'{annotations}: expected {{"images": [{{"file": ..., "words": [...]}}, ...]}}'
    found = False
    try:
        with open(annotations, "rb") as f:
            for entry in ijson.items(f, "images.item", use_float=True):
                if not isinstance(entry, dict):
                    raise DataError(shape)
                found = True
                yield entry
            if not found:  # no entries: an empty list, or no "images" list at all
                f.seek(0)
                if not any(isinstance(images, list) for images in ijson.items(f, "images")):
                    raise DataError(shape)
    except ijson.JSONError as e:
        raise DataError(f"{annotations}: not JSON ({str(e).splitlines()[0][:200]})") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{annotations}: not JSON ({e})") from None


def _checked_words(entry: dict, path: Path) -> list[dict]:
    """The entry's words as {"points", "text", "ignore"} once every polygon fits the image."""
    try:
        with Image.open(path) as image:  # the header only
            width, height = image.size
    except Exception as e:
        raise DataError(f"{path}: not an image PIL can read ({type(e).__name__})") from None
    words = entry.get("words")
    if not isinstance(words, list):
        raise DataError(f'{path}: its entry has no "words" list')
    checked = []
    for k, word in enumerate(words):
        points = word.get("points") if isinstance(word, dict) else None
        try:
            polygon = np.asarray(points, dtype=np.float64)
        except (TypeError, ValueError):
            polygon = np.zeros((0, 2))
        problem = polygon_problem(polygon, width, height)
        if problem:
            raise DataError(f"{path}: word {k} ({word.get('text', '') if isinstance(word, dict) else ''!r}): {problem}")
        checked.append({"points": polygon.tolist(), "text": str(word.get("text", "")),
                        "ignore": bool(word.get("ignore", False)) or word.get("text") == "###"})  # fmt: skip
    return checked
