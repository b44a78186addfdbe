"""A distilled study's soft targets: the teacher ensemble's out-of-fold probability rows of the CV samples, one
`.npz` (`sample_ids`, `probs` [n, C]) that `distrain distill` writes and every job of the student study reads
(`distill.teacher`). Torch-free: the checks run before any job starts."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from distrain.errors import ConfigError
from distrain.fsutil import atomic_write


def write_soft_targets(path: Path, sample_ids: list[str], probs: np.ndarray) -> Path:
    """Write the soft targets atomically; returns `path`."""
    atomic_write(path, lambda f: np.savez(f, sample_ids=np.asarray(sample_ids), probs=probs.astype(np.float32)))
    return path


def read_soft_targets(
    path: Path, cv_ids: set[str], test_ids: set[str], num_classes: int
) -> tuple[list[str], np.ndarray]:
    """(sample ids, probs [n, C]) of a soft-target file, refused in one line (ConfigError) unless it holds a finite
    probability row of `num_classes` for every CV sample and no holdout sample (holdout images never train)."""
    where = f"distill.teacher: {path}"
    try:
        with np.load(path, allow_pickle=False) as z:
            ids, probs = [str(s) for s in z["sample_ids"]], np.asarray(z["probs"], dtype=np.float32)
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as e:
        raise ConfigError(
            f"{where}: not a soft-target file with sample_ids and probs ({type(e).__name__}: {e})"
        ) from None
    if probs.ndim != 2 or probs.shape != (len(ids), num_classes):
        raise ConfigError(f"{where}: probs has shape {probs.shape}, expected ({len(ids)}, {num_classes})")
    if not np.isfinite(probs).all() or probs.min() < 0 or probs.max() > 1:
        raise ConfigError(f"{where}: probs must be probabilities in [0, 1]")
    holdout = sorted(set(ids) & test_ids)
    if holdout:
        raise ConfigError(f"{where}: holds {len(holdout)} holdout sample(s) (e.g. {holdout[0]}); holdout images "
                          "never train, not even as soft targets")  # fmt: skip
    missing = sorted(cv_ids - set(ids))
    if missing:
        raise ConfigError(f"{where}: no soft target for {len(missing)} CV sample(s) (e.g. {missing[0]})")
    return ids, probs
