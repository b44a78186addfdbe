"""A pseudo-label round's labels of the unlabelled images, one `.npz` that `distrain pseudo-label` writes and every
job of the round reads (`pseudo.labels`). Torch-free: the checks run before any job starts.

    sample_ids  [n]        the unlabelled samples (of data.unlabelled's shards)
    fold_probs  [K, n, C]  fold m's ensemble: the weighted mean of each column's fold-m model's probabilities
    fold_votes  [K, n]     how many columns' fold-m models decide the class fold m's ensemble decides

Fold m's jobs of the round take fold m's rows: fold m's models never saw fold m, the jobs' validation samples, so
no label of fold m reaches them through a pseudo-label (an ensemble of all fold models would carry them: four of
five trained on fold m, and label the unlabelled images that resemble fold m's with fold m's labels).
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from distrain.errors import ConfigError
from distrain.fsutil import atomic_write


@dataclass(frozen=True)
class PseudoLabels:
    sample_ids: list[str]
    fold_probs: np.ndarray  # [K, n, C]
    fold_votes: np.ndarray  # [K, n]
    columns: int

    def selected(self, fold: int, threshold: float, min_votes: int) -> dict[str, int]:
        """sample id -> class of the samples fold `fold`'s ensemble gives a class with probability >= `threshold`,
        decided by at least `min_votes` columns."""
        probs = self.fold_probs[fold]
        keep = (probs.max(axis=1) >= threshold) & (self.fold_votes[fold] >= min_votes)
        classes = probs.argmax(axis=1)
        return {self.sample_ids[i]: int(classes[i]) for i in np.flatnonzero(keep)}

    def selected_rows(self, fold: int, threshold: float, min_votes: int) -> tuple[list[str], np.ndarray]:
        """`selected`'s samples with fold `fold`'s ensemble's probability rows [k, C] (soft pseudo-labels)."""
        chosen = self.selected(fold, threshold, min_votes)
        index = {s: i for i, s in enumerate(self.sample_ids)}
        rows = self.fold_probs[fold][[index[s] for s in chosen]] if chosen else self.fold_probs[fold][:0]
        return list(chosen), rows


def write_pseudo_labels(path: Path, labels: PseudoLabels) -> Path:
    """Write the pseudo-labels atomically; returns `path`."""
    arrays = {"sample_ids": np.asarray(labels.sample_ids), "fold_probs": labels.fold_probs.astype(np.float32),
              "fold_votes": labels.fold_votes.astype(np.int32), "columns": np.asarray(labels.columns)}  # fmt: skip
    atomic_write(path, lambda f: np.savez(f, **arrays))
    return path


def read_pseudo_labels(path: Path, unlabelled_ids: set[str], num_classes: int, folds: int) -> PseudoLabels:
    """The pseudo-labels of a file, refused in one line (ConfigError) unless each of `folds` folds has a probability
    row of `num_classes` for samples that are all in data.unlabelled."""
    where = f"pseudo.labels: {path}"
    try:
        with np.load(path, allow_pickle=False) as z:
            ids, columns = [str(s) for s in z["sample_ids"]], int(z["columns"])
            probs, votes = np.asarray(z["fold_probs"], np.float32), np.asarray(z["fold_votes"], np.int64)
    except (OSError, KeyError, ValueError, TypeError, zipfile.BadZipFile) as e:
        problem = f"{type(e).__name__}: {e}"
        raise ConfigError(f"{where}: not a pseudo-label file (sample_ids, fold_probs, fold_votes; {problem})") from None
    if probs.shape != (folds, len(ids), num_classes) or votes.shape != (folds, len(ids)):
        raise ConfigError(f"{where}: fold_probs {probs.shape} / fold_votes {votes.shape}, expected "
                          f"{(folds, len(ids), num_classes)} / {(folds, len(ids))}")  # fmt: skip
    if not np.isfinite(probs).all() or probs.min() < 0 or probs.max() > 1:
        raise ConfigError(f"{where}: fold_probs must be probabilities in [0, 1]")
    strangers = sorted(set(ids) - unlabelled_ids)
    if strangers:
        raise ConfigError(f"{where}: {len(strangers)} sample(s) are not in data.unlabelled (e.g. {strangers[0]})")
    return PseudoLabels(ids, probs, votes, columns)
