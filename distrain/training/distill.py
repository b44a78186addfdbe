"""What a job learns from a finished study's models: the teacher's soft targets on the device, looked up per
micro-batch by sample id (`distill.teacher`; which rows a job takes: `distrain.study.soft_targets`), and a
pseudo-label round's extra training samples (`pseudo.labels`, `distrain.study.pseudo_labels`)."""

from __future__ import annotations

from pathlib import Path

import torch

from distrain.config import Config
from distrain.data.index import DatasetIndex
from distrain.data.shards import shard_samples
from distrain.data.unlabelled import unlabelled_urls
from distrain.errors import ConfigError
from distrain.study.plan import Job
from distrain.study.pseudo_labels import read_pseudo_labels
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


def pseudo_training_labels(cfg: Config, job: Job) -> dict[str, int]:
    """sample id -> class of the unlabelled samples that join `job`'s training samples: those fold `job.fold`'s
    models gave a class with pseudo.threshold and pseudo.min_votes."""
    if job.whole_pool:
        raise ConfigError("pseudo.labels: a whole-pool job has no fold whose models' labels it could take")
    ids = {ref.sample_id for url in unlabelled_urls(cfg.data.unlabelled) for ref in shard_samples(url)}
    labels = read_pseudo_labels(Path(cfg.pseudo.labels), ids, cfg.data.num_classes, cfg.cv.folds)
    return labels.selected(job.fold, cfg.pseudo.threshold, cfg.pseudo.min_votes)
