"""Data sets as WebDataset tar shards, plus the pipelines that read them for one fold.

A data set directory holds `cv-NNNNNN.tar` shards (the cross-validation pool), `test-NNNNNN.tar`
shards (a fixed stratified holdout that no fold ever trains on) and `index.json`, which lists
every sample's id, label, group and split so that folds can be built without reading images.
Each tar sample is `<sample_id>.png|.jpg` + `<sample_id>.cls` (the label).

Reading splits shards per rank (`split_by_node`) and per DataLoader worker (`split_by_worker`),
decodes each shard once per process (resized uint8 tensors, cached when `data.cache` is on), keeps
the samples of the wanted fold(s) by `sample_id`, and batches. Normalisation and augmentation run
per batch on the training device (`prepare_batch`).
"""
from __future__ import annotations

import csv
from collections import Counter
import io
import itertools
import json
import math
import random
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
import webdataset as wds
from PIL import Image

INDEX_NAME = "index.json"
INDEX_FORMAT = "distrain-shards/1"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


class DataError(ValueError):
    """Data that cannot be used as given; the message is one line naming the problem."""


@dataclass(frozen=True)
class DatasetIndex:
    """What `index.json` says about a shard directory."""

    root: Path
    channels: int
    classes: list[str]
    cv_shards: list[str]
    test_shards: list[str]
    sample_ids: list[str]
    labels: list[int]
    groups: list[str]
    splits: list[str]  # "cv" or "test" per sample

    def split_ids(self, split: str) -> list[str]:
        return [s for s, sp in zip(self.sample_ids, self.splits) if sp == split]

    def labels_of(self, split: str) -> dict[str, int]:
        return {s: y for s, y, sp in zip(self.sample_ids, self.labels, self.splits) if sp == split}

    def urls(self, split: str) -> list[str]:
        return [str(self.root / name) for name in (self.cv_shards if split == "cv" else self.test_shards)]


# ----------------------------------------------------------------------------- writing

@dataclass(frozen=True)
class Sample:
    sample_id: str
    label: int
    image_bytes: bytes
    ext: str  # "png", "jpg", ...
    group: str = ""


_ID_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def safe_sample_id(text: str) -> str:
    """A sample id usable as a WebDataset key: no dots (they separate key from extension) or slashes."""
    return _ID_UNSAFE.sub("_", text).strip("_") or "sample"


def holdout_split(labels: Sequence[int], groups: Sequence[str], test_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of the fixed holdout test samples: stratified by label, grouped when groups exist."""
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
        _, test_idx = train_test_split(idx, test_size=test_fraction, stratify=labels, random_state=seed)
    is_test[test_idx] = True
    return is_test


def write_dataset(samples: Sequence[Sample], out_dir: str | Path, *, classes: list[str], channels: int,
                  test_fraction: float = 0.2, split_seed: int = 0, shard_size: int = 64) -> DatasetIndex:
    """Write samples as cv/test shards + index.json into `out_dir`, atomically.

    Everything is written into a temporary sibling directory that is renamed into place last, so
    an interrupted write never leaves a directory that looks complete. If `out_dir` appears
    meanwhile (another rank or node won the race), the finished one is kept.
    """
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise DataError(f"{out_dir}: already exists; choose another output directory")
    ids = [s.sample_id for s in samples]
    if len(set(ids)) != len(ids):
        dup = next(i for i, c in Counter(ids).items() if c > 1)
        raise DataError(f"duplicate sample id {dup!r}")
    for s in samples:
        if not 0 <= s.label < len(classes):
            raise DataError(f"sample {s.sample_id!r}: label {s.label} outside [0, {len(classes)})")
    labels = [s.label for s in samples]
    groups = [s.group for s in samples]
    is_test = holdout_split(labels, groups, test_fraction, split_seed)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        shards = {}
        for split, mask in (("cv", ~is_test), ("test", is_test)):
            chosen = [s for s, m in zip(samples, mask) if m]
            shards[split] = _write_shards(chosen, tmp, split, shard_size)
        index = {
            "format": INDEX_FORMAT, "channels": channels, "classes": classes,
            "shards": shards,
            "samples": [{"sample_id": s.sample_id, "label": s.label, "group": s.group,
                         "split": "test" if t else "cv"} for s, t in zip(samples, is_test)],
        }
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


def _write_shards(samples: Sequence[Sample], directory: Path, split: str, shard_size: int) -> list[str]:
    names = []
    for start in range(0, len(samples), shard_size):
        name = f"{split}-{start // shard_size:06d}.tar"
        with wds.TarWriter(str(directory / name)) as sink:
            for s in samples[start:start + shard_size]:
                sink.write({"__key__": s.sample_id, s.ext: s.image_bytes, "cls": str(s.label).encode()})
        names.append(name)
    return names


def _png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def digits_samples() -> tuple[list[Sample], list[str]]:
    """scikit-learn's bundled 8x8 digits (1797 images, no download) as grayscale PNG samples."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)
    samples = [Sample(sample_id=f"digits-{i:05d}", label=int(y), image_bytes=_png_bytes(img), ext="png")
               for i, (img, y) in enumerate(zip(images, digits.target))]
    return samples, [str(c) for c in range(10)]


def write_digits(out_dir: str | Path, test_fraction: float = 0.2, shard_size: int = 64) -> DatasetIndex:
    """`distrain data digits`: the digits data set as shards with a fixed stratified holdout."""
    samples, classes = digits_samples()
    return write_dataset(samples, out_dir, classes=classes, channels=1, test_fraction=test_fraction,
                         shard_size=shard_size)


def ensure_digits(out_dir: str | Path) -> None:
    """Write the digits shards into `out_dir` unless a complete copy is there. Safe when several
    processes start together on one disk (`distrain schedule` workers, nodes sharing a file system): one
    that finds the directory written by another while it was building its own copy keeps the other's."""
    index_file = Path(out_dir) / INDEX_NAME
    if index_file.exists():
        return
    try:
        write_digits(out_dir)
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


def samples_from_csv(csv_path: str | Path) -> tuple[list[Sample], list[str]]:
    """A CSV with columns path,label[,group] (paths relative to the CSV). Labels: ints or class names."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise DataError(f"CSV not found: {csv_path}")
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"path", "label"} <= set(rows[0]):
        raise DataError(f"{csv_path}: expected a header with columns path,label[,group]")
    raw_labels = [r["label"].strip() for r in rows]
    if all(re.fullmatch(r"-?\d+", l) for l in raw_labels):
        labels = [int(l) for l in raw_labels]
        if min(labels) < 0:
            raise DataError(f"{csv_path}: negative label {min(labels)}")
        classes = [str(c) for c in range(max(labels) + 1)]
    else:
        classes = sorted(set(raw_labels))
        labels = [classes.index(l) for l in raw_labels]
    samples = []
    for row, label in zip(rows, labels):
        path = (csv_path.parent / row["path"]).resolve()
        if not path.is_file():
            raise DataError(f"{csv_path}: image not found: {row['path']}")
        samples.append(_file_sample(path, safe_sample_id(str(Path(row["path"]).with_suffix(""))), label,
                                    (row.get("group") or "").strip()))
    return samples, classes


def _file_sample(path: Path, sample_id: str, label: int, group: str) -> Sample:
    ext = path.suffix.lower().lstrip(".")
    return Sample(sample_id=sample_id, label=label, image_bytes=path.read_bytes(),
                  ext="jpg" if ext == "jpeg" else ext, group=group)


# ----------------------------------------------------------------------------- reading

def read_index(root: str | Path, num_classes: Optional[int] = None) -> DatasetIndex:
    """Load and check `index.json`: shards exist, labels lie in [0, num_classes)."""
    root = Path(root)
    path = root / INDEX_NAME
    if not path.is_file():
        raise DataError(f"data path {root}: no {INDEX_NAME} (write shards with `distrain data digits` "
                        f"or `distrain data pack`)")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise DataError(f"{path}: not valid JSON") from None
    if d.get("format") != INDEX_FORMAT:
        raise DataError(f"{path}: unknown format {d.get('format')!r} (expected {INDEX_FORMAT!r})")
    samples = d["samples"]
    index = DatasetIndex(root=root, channels=int(d["channels"]), classes=list(d["classes"]),
                         cv_shards=d["shards"]["cv"], test_shards=d["shards"]["test"],
                         sample_ids=[s["sample_id"] for s in samples], labels=[int(s["label"]) for s in samples],
                         groups=[s.get("group", "") for s in samples], splits=[s["split"] for s in samples])
    for name in index.cv_shards + index.test_shards:
        if not (root / name).is_file():
            raise DataError(f"data path {root}: shard {name} listed in {INDEX_NAME} is missing")
    if num_classes is not None:
        bad = [(s, y) for s, y in zip(index.sample_ids, index.labels) if not 0 <= y < num_classes]
        if bad:
            raise DataError(f"data path {root}: {len(bad)} labels outside [0, {num_classes}) for "
                            f"data.num_classes={num_classes}, e.g. sample {bad[0][0]!r} has label {bad[0][1]}")
    return index


# Decoded shards, per process: (url, image_size, channels) -> [(sample_id, uint8 [C,H,W], label)].
# Every job of a run reads the same shards, so each is parsed and decoded once, not once per epoch.
_DECODED_SHARDS: dict[tuple[str, int, int], list[tuple[str, torch.Tensor, int]]] = {}


def decode_shard(url: str, image_size: int, channels: int, cache: bool = True) -> list[tuple[str, torch.Tensor, int]]:
    """All samples of one shard as (sample_id, uint8 image [channels, image_size, image_size], label)."""
    key = (url, image_size, channels)
    if key in _DECODED_SHARDS:
        return _DECODED_SHARDS[key]
    mode = "L" if channels == 1 else "RGB"
    rows = []
    for sample in wds.DataPipeline(wds.SimpleShardList([url]), wds.tarfile_to_samples()):
        sid = sample["__key__"]
        ext = next((k for k in sample if k in ("png", "jpg", "jpeg", "bmp", "webp")), None)
        try:
            img = Image.open(io.BytesIO(sample[ext])).convert(mode)
        except Exception as e:
            raise DataError(f"{url}: sample {sid!r}: image cannot be decoded ({type(e).__name__})") from None
        img = img.resize((image_size, image_size), Image.BILINEAR)
        arr = np.asarray(img, dtype=np.uint8).reshape(image_size, image_size, channels)
        rows.append((sid, torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous(), int(sample["cls"])))
    if cache:
        _DECODED_SHARDS[key] = rows
    return rows


def _decoded_samples(image_size: int, channels: int, cache: bool):
    def stage(shards: Iterable[dict]) -> Iterator[tuple[str, torch.Tensor, int]]:
        for shard in shards:
            yield from decode_shard(shard["url"], image_size, channels, cache)
    return stage


def _collate(rows: list[tuple[str, torch.Tensor, int]]):
    ids, images, labels = zip(*rows)
    return torch.stack(images), torch.tensor(labels, dtype=torch.long), list(ids)


def prepare_batch(images: torch.Tensor, *, augment: bool) -> torch.Tensor:
    """uint8 [B,C,H,W] (on the training device) -> normalised float, with a random affine per image
    (rotation +-10 deg, shift +-8%, scale 0.9-1.1) when `augment`. Done per batch on the device:
    cheaper than per-sample PIL transforms on CPU and free on a GPU."""
    x = images.float().div_(127.5).sub_(1.0)  # [0, 255] -> [-1, 1]
    if not augment:
        return x
    b = x.shape[0]
    angle = (torch.rand(b, device=x.device) * 2 - 1) * (10 * math.pi / 180)
    scale = 0.9 + torch.rand(b, device=x.device) * 0.2
    shift = (torch.rand(b, 2, device=x.device) * 2 - 1) * 0.16  # grid units: 2 = full width
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, padding_mode="border", align_corners=False)


def _cycled_shards(urls: Sequence[str], seed: int) -> Iterator[dict]:
    """The shard list forever, reshuffled each pass with the same seed on every rank, so that
    split_by_node hands every rank a disjoint share of each pass."""
    for epoch in itertools.count():
        order = list(urls)
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        for url in order:
            yield {"url": url}


def check_shard_count(urls: Sequence[str], world_size: int, num_workers: int, what: str) -> None:
    """Each rank x worker must own at least one shard, or it would read nothing."""
    readers = world_size * max(1, num_workers)
    if len(urls) < readers:
        raise DataError(f"{what}: {len(urls)} shards cannot feed {world_size} ranks x {max(1, num_workers)} "
                        f"workers; write smaller shards or lower data.num_workers")


def train_loader(urls: Sequence[str], keep_ids: set[str], *, batch_size: int, image_size: int, channels: int,
                 num_workers: int, shuffle_buffer: int, seed: int, cache: bool = True) -> torch.utils.data.DataLoader:
    """An endless stream of training batches from this rank's shards, restricted to `keep_ids`.

    Callers take a fixed number of batches per epoch, the same on every rank, so DDP never waits
    on a rank that ran out of data.
    """
    rank, *_ = wds.utils.pytorch_worker_info()
    pipeline = wds.DataPipeline(
        lambda: _cycled_shards(urls, seed),
        wds.split_by_node,
        wds.split_by_worker,
        _decoded_samples(image_size, channels, cache),
        wds.select(lambda row: row[0] in keep_ids),
        # A distinct, reproducible shuffle stream per rank; workers get theirs from the DataLoader seed.
        wds.shuffle(shuffle_buffer, initial=min(shuffle_buffer, 100), seed=seed * 1000 + rank),
        wds.batched(batch_size, collation_fn=_collate, partial=False),
    )
    return _loader(pipeline, num_workers, seed)


def eval_loader(urls: Sequence[str], keep_ids: Optional[set[str]], *, batch_size: int, image_size: int,
                channels: int, num_workers: int, cache: bool = True) -> torch.utils.data.DataLoader:
    """One pass over this rank's share of `urls` (all of it in one process), each sample exactly once."""
    stages = [wds.SimpleShardList(list(urls)), wds.split_by_node, wds.split_by_worker,
              _decoded_samples(image_size, channels, cache)]
    if keep_ids is not None:
        stages.append(wds.select(lambda row: row[0] in keep_ids))
    stages.append(wds.batched(batch_size, collation_fn=_collate, partial=True))
    return _loader(wds.DataPipeline(*stages), num_workers, seed=0)


def _loader(pipeline, num_workers: int, seed: int) -> torch.utils.data.DataLoader:
    g = torch.Generator()
    g.manual_seed(seed)
    return torch.utils.data.DataLoader(pipeline, batch_size=None, num_workers=num_workers, generator=g,
                                       persistent_workers=num_workers > 0)
