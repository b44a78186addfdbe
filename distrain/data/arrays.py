"""Samples from numpy arrays (`distrain data pack --npz train.npz [--test test.npz] --images x --label y [--group g]`),
packed into the same shards and index as folders and CSVs are.

Images are N x H x W (grayscale) or N x H x W x C (C 1 or 3) arrays: uint8 as they are, other integer types when every
value lies in [0, 255], floats when every value lies in [0, 1] (scaled by 255 and rounded). Each image is stored as a
lossless PNG, so decoding gives the pixels back. Labels are N non-negative integers (class k is named "k"); groups, if
given, N values. `--images xa,xb` packs image pairs (for the pair tasks): sample i holds xa[i] and xb[i]. With
`--test`, that file's samples are the fixed holdout (instead of a stratified fraction of train.npz). The arrays are
loaded whole: they must fit in memory.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from distrain.data.pack import Sample
from distrain.errors import DataError


def samples_from_npz(
    train: str | Path, test: Optional[str | Path], images: str, label: str, group: Optional[str] = None
) -> tuple[list[Sample], list[str]]:
    """The samples of `train` (and, marked as the holdout, of `test`) and the class names. `images`: the key of the
    image array, or two keys `xa,xb` for image pairs (sample i holds xa[i] and xb[i]); `label`, `group`: those of the
    label and group arrays. Raises DataError naming the file and key."""
    keys = [k for k in images.split(",") if k]
    if len(keys) not in (1, 2):
        raise DataError(f"--images {images}: one array key, or two (xa,xb) for image pairs")
    files = [(Path(train), "cv" if test else "")] + ([(Path(test), "test")] if test else [])  # "": a fraction
    loaded = [(path, split, _arrays(path, keys, label, group)) for path, split in files]
    n_classes = 1 + max(int(y.max()) for _, _, (_, y, _) in loaded)
    samples = []
    for path, split, (xs, y, g) in loaded:
        groups = [str(v) for v in g] if g is not None else [""] * len(y)
        samples += [Sample(sample_id=f"{path.stem}-{i:06d}", label=int(y[i]), ext="png", group=groups[i],
                           image_bytes=_png(xs[0][i]), second_bytes=_png(xs[1][i]) if len(xs) > 1 else b"",
                           split=split) for i in range(len(y))]  # fmt: skip
    return samples, [str(c) for c in range(n_classes)]


def _arrays(path: Path, image_keys: list[str], label_key: str, group_key: Optional[str]):
    """([uint8 images [N, H, W(, C)] per key], int64 labels [N], groups [N] or None) of one npz file, each checked."""
    arrays = _load(path)
    for key in (*image_keys, label_key, group_key):
        if key is not None and key not in arrays:
            raise DataError(f"{path}: no array {key!r} (it holds {', '.join(sorted(arrays)) or 'none'})")
    xs, y = [_pixels(path, key, arrays[key]) for key in image_keys], arrays[label_key]
    if y.ndim != 1 or y.dtype.kind not in "iub" or (len(y) and y.min() < 0):
        raise DataError(f"{path}: label {label_key!r} must be N non-negative integers, got {y.dtype} {y.shape}")
    g = arrays[group_key] if group_key else None
    for key, a in ((label_key, y), (group_key, g), *zip(image_keys[1:], xs[1:])):
        if a is not None and len(a) != len(xs[0]):
            raise DataError(f"{path}: {key!r} has {len(a)} rows, images {image_keys[0]!r} {len(xs[0])}")
    if not len(xs[0]):
        raise DataError(f"{path}: images {image_keys[0]!r} holds no samples")
    return xs, y.astype(np.int64), g


def _load(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise DataError(f"npz file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise DataError(f"{path}: not an npz file numpy can read ({type(e).__name__}: {e})") from None


def _pixels(path: Path, key: str, x: np.ndarray) -> np.ndarray:
    """The images as uint8 [N, H, W] or [N, H, W, C], or DataError saying what is wrong with them."""
    if not (x.ndim == 3 or (x.ndim == 4 and x.shape[-1] in (1, 3))):
        raise DataError(f"{path}: images {key!r} must be N x H x W or N x H x W x C (C 1 or 3), got shape {x.shape}")
    if x.dtype == np.uint8:
        return x
    if x.dtype.kind in "iu" and (not x.size or (x.min() >= 0 and x.max() <= 255)):
        return x.astype(np.uint8)
    if x.dtype.kind == "f" and np.isfinite(x).all() and (not x.size or (x.min() >= 0 and x.max() <= 1)):
        return np.rint(x * 255.0).astype(np.uint8)
    raise DataError(f"{path}: images {key!r} ({x.dtype}) must be uint8, integers in [0, 255] or floats in [0, 1]")


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image).save(buf, format="PNG")
    return buf.getvalue()
