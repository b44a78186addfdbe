"""The teacher's soft targets of one job on the device, looked up per micro-batch by sample id (`distill.teacher`;
which rows a job takes: `distrain.study.soft_targets`)."""

from __future__ import annotations

from pathlib import Path

import torch

from distrain.data.index import DatasetIndex
from distrain.study.soft_targets import read_soft_targets


class TeacherRows:
    """Every CV sample's soft-target row for a job of fold `fold`, kept on the training device: a batch's rows are
    one gather there."""

    def __init__(self, path: Path, index: DatasetIndex, folds: int, fold: int, device: torch.device):
        cv, test = set(index.split_ids("cv")), set(index.split_ids("test"))
        targets = read_soft_targets(path, cv, test, len(index.classes), folds)
        self.row = {s: i for i, s in enumerate(targets.sample_ids)}
        self.probs = torch.as_tensor(targets.of_fold(fold), device=device)

    def of(self, sample_ids: list[str]) -> torch.Tensor:
        """[B, C]: the soft targets of a batch's samples, in its order."""
        rows = torch.tensor([self.row[s] for s in sample_ids])
        return self.probs[rows.to(self.probs.device, non_blocking=True)]
