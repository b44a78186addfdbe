"""A distilled study's soft targets, one `.npz` that `distrain distill` writes and every job of the student study
reads (`distill.teacher`). Torch-free: the checks run before any job starts.

    sample_ids  [n]        every CV sample (holdout samples never: they never train)
    probs       [n, C]     the teacher ensemble's out-of-fold row of each sample, from the fold models that did not
                           train on it: the targets of the whole-pool student (the served network)
    fold_probs  [K, n, C]  fold m's teacher models' rows of every sample: the targets of the student's fold-m job

Why two: the student's fold-m job validates on fold m, so none of its targets may carry fold m's labels. An OOF
row of a fold-k sample comes from teacher models that trained on fold m, and carries them (a memorising teacher
maps fold-k images to the labels of the fold-m images they resemble); fold m's teacher models never saw fold m.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from distrain.errors import ConfigError
from distrain.fsutil import atomic_write


@dataclass(frozen=True)
class SoftTargets:
    sample_ids: list[str]
    probs: np.ndarray  # [n, C]
    fold_probs: np.ndarray  # [K, n, C]

    def of_fold(self, fold: int) -> np.ndarray:
        """The targets of a job of fold `fold` (`WHOLE_POOL`, -1: the OOF rows)."""
        return self.probs if fold < 0 else self.fold_probs[fold]


def write_soft_targets(path: Path, targets: SoftTargets) -> Path:
    """Write the soft targets atomically; returns `path`."""
    arrays = {"sample_ids": np.asarray(targets.sample_ids), "probs": targets.probs.astype(np.float32),
              "fold_probs": targets.fold_probs.astype(np.float32)}  # fmt: skip
    atomic_write(path, lambda f: np.savez(f, **arrays))
    return path


def read_soft_targets(path: Path, cv_ids: set[str], test_ids: set[str], num_classes: int, folds: int) -> SoftTargets:
    """The soft targets of a file, refused in one line (ConfigError) unless it holds finite probability rows of
    `num_classes` for every CV sample, OOF and for each of `folds` folds, and no holdout sample."""
    where = f"distill.teacher: {path}"
    try:
        with np.load(path, allow_pickle=False) as z:
            ids = [str(s) for s in z["sample_ids"]]
            probs, fold_probs = np.asarray(z["probs"], np.float32), np.asarray(z["fold_probs"], np.float32)
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as e:
        problem = f"{type(e).__name__}: {e}"
        raise ConfigError(f"{where}: not a soft-target file (sample_ids, probs, fold_probs; {problem})") from None
    n = len(ids)
    for name, array, shape in (("probs", probs, (n, num_classes)), ("fold_probs", fold_probs, (folds, n, num_classes))):
        if array.shape != shape:
            raise ConfigError(f"{where}: {name} has shape {array.shape}, expected {shape}")
        if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
            raise ConfigError(f"{where}: {name} must be probabilities in [0, 1]")
    holdout = sorted(set(ids) & test_ids)
    if holdout:
        raise ConfigError(f"{where}: holds {len(holdout)} holdout sample(s) (e.g. {holdout[0]}); holdout images "
                          "never train, not even as soft targets")  # fmt: skip
    missing = sorted(cv_ids - set(ids))
    if missing:
        raise ConfigError(f"{where}: no soft target for {len(missing)} CV sample(s) (e.g. {missing[0]})")
    return SoftTargets(ids, probs, fold_probs)
