"""A data set's `index.json`: every sample's id, label, group and split, and its shard files.

A data set directory holds `cv-NNNNNN.tar` shards (the cross-validation pool), `test-NNNNNN.tar`
shards (a fixed stratified holdout that no fold ever trains on) and `index.json`, so that folds can
be built and run directories read without opening an image (and without importing torch).

A label-set data set (`"multilabel": true`, for a task whose labels are sets) gives each sample a list of class
indices (possibly empty) instead of one; `labels_of` hands them out as 0/1 rows over the classes, as loaders, OOF
files and the ensembles use them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from distrain.errors import DataError
from distrain.tasks import LABEL_SETS_KEY, Label, get_task

INDEX_NAME = "index.json"
INDEX_FORMAT = "distrain-shards/1"
IMAGES_KEY = "images_per_sample"
"""The `index.json` key of a data set of image pairs (2); absent: one image per sample."""
ANNOTATIONS_KEY = "annotations"
"""The `index.json` key of a dense data set: the extension of each sample's annotation member ("json": text regions,
"mask.png": a class-id mask); absent: the label is the target."""


def multi_hot(classes: tuple[int, ...], n: int) -> tuple[int, ...]:
    """A label-set sample's class indices as a 0/1 row over `n` classes."""
    return tuple(int(c in classes) for c in range(n))


@dataclass(frozen=True)
class DatasetIndex:
    """What `index.json` says about a shard directory."""

    root: Path
    channels: int
    classes: list[str]
    cv_shards: list[str]
    test_shards: list[str]
    sample_ids: list[str]
    labels: list[Label]  # class indices; label sets: tuples of class indices
    groups: list[str]
    splits: list[str]  # "cv" or "test" per sample
    label_sets: bool = False
    images_per_sample: int = 1
    annotations: str = ""

    def split_ids(self, split: str) -> list[str]:
        return [s for s, sp in zip(self.sample_ids, self.splits) if sp == split]

    def labels_of(self, split: str) -> dict[str, Label]:
        """sample id -> class index, or for a label-set data set a 0/1 tuple over the classes."""
        if not self.label_sets:
            return {s: y for s, y, sp in zip(self.sample_ids, self.labels, self.splits) if sp == split}
        n = len(self.classes)
        return {s: multi_hot(y, n) for s, y, sp in zip(self.sample_ids, self.labels, self.splits) if sp == split}

    def urls(self, split: str) -> list[str]:
        return [str(self.root / name) for name in (self.cv_shards if split == "cv" else self.test_shards)]


def read_index(root: str | Path, num_classes: Optional[int] = None, task: Optional[str] = None) -> DatasetIndex:
    """Load and check `index.json`: shards exist, labels lie in [0, num_classes), label lists exactly when the task
    named `task` takes label sets."""
    root = Path(root)
    path = root / INDEX_NAME
    if not path.is_file():
        raise DataError(
            f"data path {root}: no {INDEX_NAME} (write shards with `distrain data digits` or `distrain data pack`)"
        )
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise DataError(f"{path}: not valid JSON") from None
    if not isinstance(d, dict) or d.get("format") != INDEX_FORMAT:
        found = d.get("format") if isinstance(d, dict) else type(d).__name__
        raise DataError(f"{path}: unknown format {found!r} (expected {INDEX_FORMAT!r})")
    try:
        index = _index_from_json(root, d)
    except (KeyError, TypeError, ValueError, AttributeError) as e:  # a hand-edited or truncated-by-hand index
        what = f"missing key {e}" if isinstance(e, KeyError) else f"{type(e).__name__}: {e}"
        raise DataError(f"{path}: not a distrain index ({what}); write it with `distrain data pack`") from None
    _check_index(index, num_classes, task)
    return index


def _index_from_json(root: Path, d: dict) -> DatasetIndex:
    samples, label_sets = d["samples"], bool(d.get(LABEL_SETS_KEY, False))
    return DatasetIndex(
        root=root,
        channels=int(d["channels"]),
        classes=list(d["classes"]),
        cv_shards=d["shards"]["cv"],
        test_shards=d["shards"]["test"],
        sample_ids=[s["sample_id"] for s in samples],
        labels=[tuple(map(int, s["label"])) if label_sets else int(s["label"]) for s in samples],
        groups=[s.get("group", "") for s in samples],
        splits=[s["split"] for s in samples],
        label_sets=label_sets,
        images_per_sample=int(d.get(IMAGES_KEY, 1)),
        annotations=str(d.get(ANNOTATIONS_KEY, "")),
    )


def _check_index(index: DatasetIndex, num_classes: Optional[int], task: Optional[str]) -> None:
    root, label_sets = index.root, index.label_sets
    if not index.sample_ids:
        raise DataError(f"data path {root}: {INDEX_NAME} lists no samples")
    if task is not None and label_sets != get_task(task).label_sets:
        need = "label sets (a data set packed with --multilabel)" if label_sets is False else "one label per sample"
        raise DataError(f"data path {root}: task {task} needs {need}; {INDEX_NAME} says {LABEL_SETS_KEY}={label_sets}")
    if task is not None and index.images_per_sample != get_task(task).images_per_sample:
        raise DataError(f"data path {root}: task {task} takes {get_task(task).images_per_sample} image(s) per sample; "
                        f"{INDEX_NAME} says {index.images_per_sample}")  # fmt: skip
    if task is not None and index.annotations != get_task(task).annotation:
        has = f"annotations {index.annotations!r}" if index.annotations else "no annotations"
        need = f"{get_task(task).annotation!r} annotations" if get_task(task).annotation else "no annotations"
        raise DataError(f"data path {root}: task {task} takes samples with {need}; {INDEX_NAME} says {has}")
    for name in index.cv_shards + index.test_shards:
        if not (root / name).is_file():
            raise DataError(f"data path {root}: shard {name} listed in {INDEX_NAME} is missing")
    if num_classes is not None:
        bad = [(s, y) for s, y in zip(index.sample_ids, index.labels)
               if not all(0 <= c < num_classes for c in (y if label_sets else (y,)))]  # fmt: skip
        if bad:
            raise DataError(
                f"data path {root}: {len(bad)} labels outside [0, {num_classes}) for "
                f"data.num_classes={num_classes}, e.g. sample {bad[0][0]!r} has label {bad[0][1]}"
            )
