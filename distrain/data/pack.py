"""Writing data sets: samples from a folder, a CSV or scikit-learn's digits, packed into WebDataset
shards (`<sample_id>.png|.jpg` + `<sample_id>.cls`) with a fixed stratified holdout and `index.json`.
Label-set samples carry a tuple of class indices; such a data set's index says `"multilabel": true`.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import webdataset as wds
from PIL import Image
from tqdm.auto import tqdm

from distrain.console import is_terminal
from distrain.data.index import (
    ANNOTATIONS_KEY,
    IMAGES_KEY,
    INDEX_FORMAT,
    INDEX_NAME,
    DatasetIndex,
    multi_hot,
    read_index,
)
from distrain.data.shards import SECOND
from distrain.errors import DataError
from distrain.tasks import DEFAULT_TASK, LABEL_SETS_KEY, Label, get_task, label_set_strata

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
"""The `index.json` key of a data set whose samples carry a dense target: its member's extension in the shards
(`json` for text polygons, `mask.png` for segmentation masks)."""


@dataclass(frozen=True)
class Sample:
    """One image to pack: its bytes in memory (`image_bytes`) or, so that packing streams, a file (`path`)."""

    sample_id: str
    label: Label  # a class index; label sets: a tuple of class indices (empty for none)
    ext: str  # "png", "jpg", ...
    group: str = ""
    image_bytes: bytes = b""
    path: Optional[Path] = None
    split: str = ""  # "cv" or "test" when the source fixes the holdout; "" leaves it to `holdout_split`
    second_bytes: bytes = b""  # an image pair's second image, in memory (same extension as the first) ...
    second_path: Optional[Path] = None  # ... or a file
    second_ext: str = ""  # the second image's extension ("": the first's)
    annotation: bytes = b""  # a dense task's target (text detection: the words as JSON; segmentation: a mask PNG)
    annotation_ext: str = "json"  # its member name in the shard: `<sample_id>.<annotation_ext>`
    stratum: Optional[int] = None  # what splits stratify on when the label is not a class (e.g. a word-count bucket)

    def read(self) -> bytes:
        return self.path.read_bytes() if self.path is not None else self.image_bytes

    def read_second(self) -> bytes:
        return self.second_path.read_bytes() if self.second_path is not None else self.second_bytes

    @property
    def is_pair(self) -> bool:
        return bool(self.second_bytes) or self.second_path is not None

    @property
    def nbytes(self) -> int:
        first = self.path.stat().st_size if self.path is not None else len(self.image_bytes)
        return first + (self.second_path.stat().st_size if self.second_path is not None else len(self.second_bytes))


@dataclass(frozen=True)
class ShardLimits:
    """Where one shard ends: at `max_mb` megabytes (webdataset suggests 100 MB to 1 GB), or `max_samples`
    samples (0: no such limit); smaller when the split would otherwise give fewer than `min_shards` shards,
    so that every rank x DataLoader worker of a large job still gets shards of its own."""

    max_mb: float = 256.0
    max_samples: int = 0
    min_shards: int = 32

    def max_bytes(self, total_bytes: int) -> float:
        return min(self.max_mb * 1e6, max(1.0, total_bytes / self.min_shards))


_ID_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def safe_sample_id(text: str) -> str:
    """A sample id usable as a WebDataset key: no dots (they separate key from extension) or slashes."""
    return _ID_UNSAFE.sub("_", text).strip("_") or "sample"


def holdout_split(labels: Sequence[Label], groups: Sequence[str], test_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of the fixed holdout test samples: stratified by label (label sets: by `label_set_strata`),
    grouped when groups exist."""
    n = len(labels)
    is_test = np.zeros(n, dtype=bool)
    if test_fraction <= 0:
        return is_test
    from sklearn.model_selection import GroupShuffleSplit, train_test_split

    idx = np.arange(n)
    if any(groups):
        splitter = GroupShuffleSplit(n_splits=1, test_size=test_fraction, random_state=seed)
        _, test_idx = next(splitter.split(idx, labels, groups))
    else:
        if labels and isinstance(labels[0], tuple):
            n_labels = 1 + max((c for y in labels for c in y), default=0)
            labels = label_set_strata(np.asarray([multi_hot(y, n_labels) for y in labels]), 2)
        counts = Counter(labels)  # a stratum of one sample (a rare word-count bucket) joins the largest
        largest = counts.most_common(1)[0][0]
        labels = [y if counts[y] > 1 else largest for y in labels]
        n_test = int(np.ceil(test_fraction * n))
        if len(set(labels)) > min(n_test, n - n_test):  # too few samples to put every stratum on both sides
            labels = None
        _, test_idx = train_test_split(idx, test_size=test_fraction, stratify=labels, random_state=seed)
    is_test[test_idx] = True
    return is_test


def write_dataset(
    samples: Sequence[Sample],
    out_dir: str | Path,
    *,
    classes: list[str],
    channels: Optional[int] = None,
    test_fraction: float = 0.2,
    split_seed: int = 0,
    limits: ShardLimits = ShardLimits(),
    shuffle_seed: Optional[int] = 0,
) -> DatasetIndex:
    """Write samples as cv/test shards + index.json into `out_dir`, streaming: one image's bytes in memory at
    a time. Samples go into the shards in a seeded random order (`shuffle_seed`; None keeps the given
    order), so no shard holds one class only. `channels` None: 1 when every image is grayscale, else 3.

    Everything is written into a temporary sibling directory that is renamed into place last, so
    an interrupted write never leaves a directory that looks complete. If `out_dir` appears
    meanwhile (another rank or node won the race), the finished one is kept.
    """
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise DataError(f"{out_dir}: already exists; choose another output directory")
    _check_samples(samples, classes)
    if any(s.split for s in samples):  # the source names its holdout (`--npz ... --test`)
        is_test = np.array([s.split == "test" for s in samples])
    else:
        strata = [s.label if s.stratum is None else s.stratum for s in samples]
        is_test = holdout_split(strata, [s.group for s in samples], test_fraction, split_seed)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        shards, colour = {}, set()
        with tqdm(total=len(samples), unit="img", desc=f"packing {out_dir.name}", disable=not is_terminal()) as bar:
            for split, mask in (("cv", ~is_test), ("test", is_test)):
                chosen = _shuffled([s for s, m in zip(samples, mask) if m], shuffle_seed)
                shards[split] = _write_shards(chosen, tmp, split, limits, colour, bar)
        label_sets = bool(samples) and isinstance(samples[0].label, tuple)
        pairs = {IMAGES_KEY: 2} if samples and samples[0].is_pair else {}
        dense = {ANNOTATIONS_KEY: samples[0].annotation_ext} if samples and samples[0].annotation else {}
        index = {
            "format": INDEX_FORMAT, "channels": channels or (3 if True in colour else 1), "classes": classes,
            "shards": shards, **({LABEL_SETS_KEY: True} if label_sets else {}), **pairs, **dense,
            "samples": [{"sample_id": s.sample_id, "label": list(s.label) if label_sets else s.label,
                         "group": s.group, "split": "test" if t else "cv",
                         **({"stratum": s.stratum} if s.stratum is not None else {})}
                        for s, t in zip(samples, is_test)],
        }  # fmt: skip
        (tmp / INDEX_NAME).write_text(json.dumps(index))
        try:
            tmp.rename(out_dir)
        except OSError:
            if not (out_dir / INDEX_NAME).exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return read_index(out_dir)


def _check_samples(samples: Sequence[Sample], classes: list[str]) -> None:
    ids = [s.sample_id for s in samples]
    if len(set(ids)) != len(ids):
        dup = next(i for i, c in Counter(ids).items() if c > 1)
        raise DataError(f"duplicate sample id {dup!r}")
    if len({isinstance(s.label, tuple) for s in samples}) > 1:
        raise DataError("samples mix single labels and label lists")
    if len({s.is_pair for s in samples}) > 1:
        raise DataError("samples mix single images and image pairs")
    for s in samples:
        if not all(0 <= c < len(classes) for c in (s.label if isinstance(s.label, tuple) else (s.label,))):
            raise DataError(f"sample {s.sample_id!r}: label {s.label} outside [0, {len(classes)})")
    distinct = {s.label for s in samples}
    # a classifier of one label would learn a constant and score 1.0; a dense target varies within its one class
    if len(distinct) < 2 and not any(s.annotation for s in samples):
        only = next(iter(distinct), None)
        named = [classes[c] for c in only] if isinstance(only, tuple) else classes[only] if only is not None else None
        raise DataError(f"all {len(samples)} samples have the label {named!r}: a classifier needs at least two")


def _shuffled(samples: list[Sample], seed: Optional[int]) -> list[Sample]:
    if seed is None:
        return samples
    order = np.random.default_rng(seed).permutation(len(samples))
    return [samples[i] for i in order]


def _write_shards(samples: Sequence[Sample], directory: Path, split: str, limits: ShardLimits, colour: set,
                  bar) -> list[str]:  # fmt: skip
    """Stream samples into `<split>-NNNNNN.tar` shards within `limits`; notes in `colour` whether each image
    is in colour. Returns the shard names."""
    max_bytes = limits.max_bytes(sum(_tar_bytes(s.nbytes) for s in samples))
    names: list[str] = []
    sink, count, size = None, 0, 0
    try:
        for s in samples:
            data = s.read()
            cost = _tar_bytes(len(data))
            full = (limits.max_samples and count >= limits.max_samples) or (count and size + cost > max_bytes)
            if sink is None or full:
                if sink is not None:
                    sink.close()
                names.append(f"{split}-{len(names):06d}.tar")
                sink, count, size = wds.TarWriter(str(directory / names[-1])), 0, 0
            colour.add(_is_colour(data, s))
            cls = " ".join(map(str, s.label)) if isinstance(s.label, tuple) else str(s.label)
            record = {"__key__": s.sample_id, s.ext: data, "cls": cls.encode()}
            if s.annotation:
                record[s.annotation_ext] = s.annotation
            if s.is_pair:
                second = s.read_second()
                colour.add(_is_colour(second, s))
                record[f"{SECOND}.{s.second_ext or s.ext}"] = second
            sink.write(record)
            count, size = count + 1, size + cost
            bar.update(1)
    finally:
        if sink is not None:
            sink.close()
    return names


def _tar_bytes(image_bytes: int) -> int:
    """What one sample adds to a tar shard: a 512-byte header and 512-byte blocks for the image, the same
    for its label (small images are mostly tar overhead)."""
    return 512 + -(-image_bytes // 512) * 512 + 1024


def _is_colour(data: bytes, sample: Sample) -> bool:
    """From the image's header only (no decoding): a colour mode, or not."""
    try:
        mode = Image.open(io.BytesIO(data)).mode
    except Exception as e:
        where = sample.path or sample.sample_id
        raise DataError(f"{where}: not an image PIL can read ({type(e).__name__})") from None
    return mode not in ("1", "L", "LA", "I", "I;16", "F")


def _png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def digits_samples(task: str = DEFAULT_TASK) -> tuple[list[Sample], list[str]]:
    """scikit-learn's bundled 8x8 digits (1797 images, no download) as grayscale PNG samples, labelled for the
    task named `task` (its `digits_labels`)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)
    if get_task(task).images_per_sample == 2:
        return _digit_pair_samples(images, digits.target, task)
    labels, classes = get_task(task).digits_labels(digits.target)
    samples = [
        Sample(sample_id=f"digits-{i:05d}", label=label, ext="png", image_bytes=_png_bytes(img))
        for i, (img, label) in enumerate(zip(images, labels))
    ]
    return samples, classes


DIGIT_PAIR_BLOCK = 4
"""Images of each of a block's two digits: a block holds 2 x 4 images, and its pairs never leave it."""


def _digit_pair_samples(images: np.ndarray, digits: np.ndarray, task: str) -> tuple[list[Sample], list[str]]:
    """Pairs of the digits, half of them the same digit, built in blocks of 4 images of one digit and 4 of another
    (seeded): each block gives 5 same-digit and 5 different-digit pairs of its own images and is one group, so
    that no image is in the pairs of two folds (or of CV and the holdout). Labelled by the task's `digits_labels`
    of the pair's two digits."""
    rng = np.random.default_rng(0)
    pools = [list(rng.permutation(np.flatnonzero(digits == d))) for d in range(10)]
    samples, block = [], 0
    while True:
        ready = [d for d in range(10) if len(pools[d]) >= DIGIT_PAIR_BLOCK]
        if len(ready) < 2:
            break
        first, second = rng.choice(ready, size=2, replace=False)
        members = {d: [pools[d].pop() for _ in range(DIGIT_PAIR_BLOCK)] for d in (first, second)}
        same = [(a, b) for d in members for k, a in enumerate(members[d]) for b in members[d][k + 1 :]]
        different = [(a, b) for a in members[first] for b in members[second]]
        for a, b in [same[i] for i in rng.choice(len(same), 5, replace=False)] + [
            different[i] for i in rng.choice(len(different), 5, replace=False)
        ]:
            label = get_task(task).digits_labels(digits[[a, b]])[0][0]
            samples.append(Sample(sample_id=f"digitpairs-{len(samples):05d}", label=label, ext="png",
                                  group=f"block-{block:03d}", image_bytes=_png_bytes(images[a]),
                                  second_bytes=_png_bytes(images[b])))  # fmt: skip
        block += 1
    return samples, get_task(task).digits_labels(np.zeros(2, dtype=np.int64))[1]


def write_digits(
    out_dir: str | Path, test_fraction: float = 0.2, shard_size: int = 64, task: str = DEFAULT_TASK
) -> DatasetIndex:
    """`distrain data digits`: the digits data set as shards with a fixed stratified holdout (grouped for pairs).
    scikit-learn's order already cycles through the classes; it is kept, so results stay comparable across
    versions."""
    samples, classes = digits_samples(task)
    return write_dataset(samples, out_dir, classes=classes, channels=1, test_fraction=test_fraction,
                         limits=ShardLimits(max_samples=shard_size, min_shards=1), shuffle_seed=None)  # fmt: skip


def ensure_digits(out_dir: str | Path, task: str = DEFAULT_TASK) -> None:
    """Write the digits shards into `out_dir` unless a complete copy is there. Safe when several
    processes start together on one disk (`distrain schedule` workers, nodes sharing a file system): one
    that finds the directory written by another while it was building its own copy keeps the other's."""
    index_file = Path(out_dir) / INDEX_NAME
    if index_file.exists():
        return
    try:
        write_digits(out_dir, task=task)
    except DataError:
        if not index_file.exists():  # not a lost race: a directory without an index is in the way
            raise


def samples_from_folder(folder: str | Path) -> tuple[list[Sample], list[str]]:
    """One subfolder per class (sorted names become labels 0..C-1), images inside."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"image folder not found: {folder}")
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if len(classes) < 2:
        raise DataError(f"{folder}: expected one subfolder per class, found {len(classes)}")
    samples = []
    for label, name in enumerate(classes):
        for path in sorted((folder / name).rglob("*")):
            if path.suffix.lower() in IMAGE_EXTENSIONS:
                rel = path.relative_to(folder).with_suffix("")
                samples.append(_file_sample(path, safe_sample_id(str(rel)), label, ""))
    return samples, classes


def samples_from_csv(csv_path: str | Path, label_sets: bool = False) -> tuple[list[Sample], list[str]]:
    """A CSV with columns path,label[,group] (paths relative to the CSV). Labels: ints or class names; with
    `label_sets`, each a list of them separated by spaces, `|` or `;` (empty: no label)."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise DataError(f"CSV not found: {csv_path}")
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    if rows and {"path_a", "path_b", "label"} <= set(rows[0]):
        return _pairs_from_csv(csv_path, rows)
    if not rows or not {"path", "label"} <= set(rows[0]):
        raise DataError(f"{csv_path}: expected a header with columns path,label[,group] (pairs: path_a,path_b,label)")
    raw = [[t for t in re.split(r"[\s|;]+", r["label"] or "") if t] if label_sets else [(r["label"] or "").strip()]
           for r in rows]  # fmt: skip
    labels, classes = _label_indices(csv_path, raw)
    if not label_sets:
        labels = [y[0] for y in labels]
    samples = []
    for row, label in zip(rows, labels):
        path = (csv_path.parent / row["path"]).resolve()
        if not path.is_file():
            raise DataError(f"{csv_path}: image not found: {row['path']}")
        samples.append(
            _file_sample(
                path, safe_sample_id(str(Path(row["path"]).with_suffix(""))), label, (row.get("group") or "").strip()
            )
        )
    return samples, classes


def _pairs_from_csv(csv_path: Path, rows: list[dict]) -> tuple[list[Sample], list[str]]:
    """Image pairs of a CSV with columns path_a,path_b,label[,group]: one label per pair; the sample id is made of
    both paths."""
    labels, classes = _label_indices(csv_path, [[(r["label"] or "").strip()] for r in rows])
    samples = []
    for row, (label,) in zip(rows, labels):
        paths = []
        for key in ("path_a", "path_b"):
            path = (csv_path.parent / (row[key] or "")).resolve()
            if not row[key] or not path.is_file():
                raise DataError(f"{csv_path}: image not found: {row[key]!r} ({key})")
            paths.append(path)
        ids = [str(Path(row[k]).with_suffix("")) for k in ("path_a", "path_b")]
        first = _file_sample(paths[0], safe_sample_id("__".join(ids)), label, (row.get("group") or "").strip())
        ext = paths[1].suffix.lower().lstrip(".")
        samples.append(dataclasses.replace(first, second_path=paths[1], second_ext="jpg" if ext == "jpeg" else ext))
    return samples, classes


def _label_indices(csv_path: Path, raw: list[list[str]]) -> tuple[list[tuple[int, ...]], list[str]]:
    """Each row's labels as class indices, and the class names: ints are indices themselves, names are sorted."""
    tokens = [t for row in raw for t in row]
    if any(t == "" for t in tokens):
        raise DataError(f"{csv_path}: row {next(i for i, r in enumerate(raw) if '' in r) + 2} has an empty label")
    if tokens and all(re.fullmatch(r"-?\d+", t) for t in tokens):
        if min(map(int, tokens)) < 0:
            raise DataError(f"{csv_path}: negative label {min(map(int, tokens))}")
        classes = [str(c) for c in range(max(map(int, tokens)) + 1)]
        return [tuple(sorted({int(t) for t in row})) for row in raw], classes
    classes = sorted(set(tokens))
    position = {c: i for i, c in enumerate(classes)}
    return [tuple(sorted({position[t] for t in row})) for row in raw], classes


def _file_sample(path: Path, sample_id: str, label: Label, group: str) -> Sample:
    ext = path.suffix.lower().lstrip(".")
    return Sample(sample_id=sample_id, label=label, ext="jpg" if ext == "jpeg" else ext, group=group, path=path)
