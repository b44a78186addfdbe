"""Segmentation samples (`distrain data pack --masks MASKS --images DIR`): every image of DIR with the PNG of
class ids of the same name (any extension for the image, `.png` for the mask) in MASKS; 255 marks unlabelled
pixels. The mask travels in the shard as `<sample_id>.mask.png`. Refused in one line naming the image: a missing
mask, a mask of another size, a mask that is not single-channel 8-bit. Classes: 0..max id found (or the names
given); splits stratify on each image's dominant labelled class other than 0 (0 when it has none)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from distrain.data.pack import IMAGE_EXTENSIONS, Sample, safe_sample_id
from distrain.errors import DataError

IGNORE_ID = 255
MASK_EXT = "mask.png"


def samples_from_masks(images: str | Path, masks: str | Path, class_names: list[str] | None = None,
                       groups: str | Path | None = None) -> tuple[list[Sample], list[str]]:  # fmt: skip
    """One sample per image, its mask's bytes as the annotation; the classes found (or `class_names`). `groups`: a
    CSV of `image,group` rows (the image's path under `images`) naming every image's group (a scene, a patient):
    a group's images stay on one side of the holdout and in one fold."""
    images, masks = Path(images), Path(masks)
    for folder, what in ((images, "image"), (masks, "mask")):
        if not folder.is_dir():
            raise DataError(f"{what} folder not found: {folder}")
    group_of = read_groups(Path(groups)) if groups else None
    samples, top = [], 0
    for path in sorted(p for p in images.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS):
        rel = path.relative_to(images).with_suffix("")
        mask_path = masks / rel.with_suffix(".png")
        ids = _mask_ids(path, mask_path)
        labelled = ids[(ids != IGNORE_ID)]
        top = max(top, int(labelled.max(initial=0)))
        counts = np.bincount(labelled[labelled > 0].astype(np.int64))
        ext = path.suffix.lower().lstrip(".")
        name = path.relative_to(images).as_posix()
        if group_of is not None and name not in group_of:
            raise DataError(f"{path}: no row in {groups} (every image needs its group)")
        samples.append(Sample(sample_id=safe_sample_id(str(rel)), label=0, ext="jpg" if ext == "jpeg" else ext,
                              path=path, annotation=mask_path.read_bytes(), annotation_ext=MASK_EXT,
                              group=group_of[name] if group_of is not None else "",
                              stratum=int(counts.argmax()) if counts.size else 0))  # fmt: skip
    classes = class_names or [str(c) for c in range(top + 1)]
    if top >= len(classes):
        raise DataError(f"{masks}: class id {top} found but only {len(classes)} class names given")
    return samples, classes


def _mask_ids(image_path: Path, mask_path: Path) -> np.ndarray:
    if not mask_path.is_file():
        raise DataError(f"{image_path}: no mask {mask_path}")
    try:
        with Image.open(image_path) as image:
            size = image.size
        with Image.open(mask_path) as mask:
            mode, mask_size, ids = mask.mode, mask.size, np.asarray(mask)
    except Exception as e:
        raise DataError(f"{image_path}: image or mask PIL cannot read ({type(e).__name__})") from None
    if mode not in ("L", "P"):
        raise DataError(f"{mask_path}: a mask must be a single-channel 8-bit PNG of class ids, got mode {mode}")
    if mask_size != size:
        raise DataError(f"{image_path}: mask {mask_path.name} is {mask_size[0]}x{mask_size[1]}, "
                        f"the image {size[0]}x{size[1]}")  # fmt: skip
    return ids


def read_groups(path: Path) -> dict[str, str]:
    """`image,group` rows of a CSV (a header row of exactly that is skipped) -> {image: group}. DataError naming the
    row for a missing file, a row without both values, or an image named twice."""
    import csv

    if not path.is_file():
        raise DataError(f"groups file not found: {path}")
    groups: dict[str, str] = {}
    with open(path, newline="") as f:
        for line, row in enumerate(csv.reader(f), start=1):
            if line == 1 and [c.strip() for c in row] == ["image", "group"]:
                continue
            if len(row) != 2 or not row[0].strip() or not row[1].strip():
                raise DataError(f"{path}:{line}: expected 'image,group', got {','.join(row)!r}")
            image = row[0].strip()
            if image in groups:
                raise DataError(f"{path}:{line}: image {image!r} named twice")
            groups[image] = row[1].strip()
    return groups
