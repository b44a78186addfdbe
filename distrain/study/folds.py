"""The fold manifest: which CV fold each sample id belongs to, built once, hashed, persisted.

The manifest depends only on the sample ids, labels, groups, K and the fold seed, never on the
number of processes or nodes, so every rank and every re-run agrees on it. It is stored in the
run directory as `folds.json` with a content hash; a run directory whose manifest differs from the
one the config implies is refused.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from distrain.errors import DataError, FoldManifestMismatch
from distrain.fsutil import atomic_write_text


@dataclass(frozen=True)
class FoldManifest:
    n_folds: int
    fold_seed: int
    strategy: str  # "stratified" or "stratified_group"
    fold_of_sample: dict[str, int]

    @property
    def hash(self) -> str:
        """sha256 over the parameters and the sorted (sample_id, fold) pairs."""
        h = hashlib.sha256(f"{self.n_folds}|{self.fold_seed}|{self.strategy}\n".encode())
        for sid in sorted(self.fold_of_sample):
            h.update(f"{sid}\t{self.fold_of_sample[sid]}\n".encode())
        return h.hexdigest()

    def to_json(self) -> str:
        return json.dumps(
            {
                "n_folds": self.n_folds,
                "fold_seed": self.fold_seed,
                "strategy": self.strategy,
                "hash": self.hash,
                "fold_of_sample": self.fold_of_sample,
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> FoldManifest:
        d = json.loads(text)
        m = cls(
            n_folds=d["n_folds"],
            fold_seed=d["fold_seed"],
            strategy=d["strategy"],
            fold_of_sample={k: int(v) for k, v in d["fold_of_sample"].items()},
        )
        if m.hash != d["hash"]:
            raise FoldManifestMismatch("folds.json: stored hash does not match its contents (file edited or corrupted)")
        return m


def build_fold_manifest(
    sample_ids: Sequence[str],
    strata: Sequence[int],
    n_folds: int,
    fold_seed: int,
    groups: Optional[Sequence[str]] = None,
) -> FoldManifest:
    """Stratified (or stratified-grouped, when groups are given) K-fold assignment of sample ids. `strata`: one
    stratification key per sample, the task's `fold_strata` of its labels (the class of a one-of-C sample).

    Samples are sorted by id first, so the result does not depend on the order they were read in.
    Raises DataError when the data cannot fill the folds.
    """
    order = np.argsort(np.asarray(sample_ids, dtype=object).astype(str), kind="stable")
    ids = [str(sample_ids[i]) for i in order]
    if len(set(ids)) != len(ids):
        raise DataError("sample ids are not unique")
    y = np.asarray(strata)[order]
    counts = np.bincount(y)
    if (counts[counts > 0] < n_folds).any():
        rare = int(np.flatnonzero((counts > 0) & (counts < n_folds))[0])
        raise DataError(f"class {rare} has {counts[rare]} samples, fewer than cv.folds={n_folds}")
    # imported here: scikit-learn takes ~0.8 s, and only the process that builds a new manifest needs it
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    if groups is not None and any(g not in (None, "") for g in groups):
        g = np.asarray([str(groups[i]) for i in order])
        if len(set(g)) < n_folds:
            raise DataError(f"{len(set(g))} groups cannot fill cv.folds={n_folds} folds")
        splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=fold_seed)
        splits, strategy = splitter.split(np.zeros(len(ids)), y, g), "stratified_group"
    else:
        splitter = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=fold_seed)
        splits, strategy = splitter.split(np.zeros(len(ids)), y), "stratified"
    fold_of_sample: dict[str, int] = {}
    for fold, (_, val_idx) in enumerate(splits):
        for i in val_idx:
            fold_of_sample[ids[i]] = fold
    return FoldManifest(n_folds=n_folds, fold_seed=fold_seed, strategy=strategy, fold_of_sample=fold_of_sample)


def persist_or_check(manifest: FoldManifest, path: Path) -> FoldManifest:
    """Write the manifest at `path` if absent; if present, refuse unless it is the same manifest."""
    if path.exists():
        stored = FoldManifest.from_json(path.read_text())
        if stored.hash != manifest.hash:
            raise FoldManifestMismatch(
                f"{path}: this run directory was split with a different fold manifest "
                f"(stored {stored.hash[:12]}, K={stored.n_folds}, seed={stored.fold_seed}; "
                f"config gives {manifest.hash[:12]}, K={manifest.n_folds}, seed={manifest.fold_seed}); "
                f"use another experiment name or delete the run directory"
            )
        return stored
    atomic_write_text(path, manifest.to_json())
    return manifest
