"""What a job learns from a finished study's models: the teacher's soft targets on the device, looked up per
micro-batch by sample id (`distill.teacher`; which rows a job takes: `distrain.study.soft_targets`), and a
pseudo-label round's extra training samples (`pseudo.labels`, `distrain.study.pseudo_labels`)."""

from __future__ import annotations

from pathlib import Path

import torch

from distrain.config import Config, PseudoConfig
from distrain.data.index import DatasetIndex
from distrain.data.shards import shard_samples
from distrain.data.unlabelled import unlabelled_urls
from distrain.errors import ConfigError
from distrain.study.plan import Job
from distrain.study.pseudo_labels import PseudoLabels, read_pseudo_labels
from distrain.study.soft_targets import read_soft_targets


class TeacherRows:
    """Every CV sample's soft-target row for a job of fold `fold`, kept on the training device: a batch's rows are
    one gather there."""

    def __init__(self, path: Path, index: DatasetIndex, folds: int, fold: int, device: torch.device):
        cv, test = set(index.split_ids("cv")), set(index.split_ids("test"))
        targets = read_soft_targets(path, cv, test, len(index.classes), folds)
        self.row = {s: i for i, s in enumerate(targets.sample_ids)}
        self.probs = torch.as_tensor(targets.of_fold(fold), dtype=torch.float32, device=device)

    def of(self, sample_ids: list[str]) -> torch.Tensor:
        """[B, C]: the soft targets of a batch's samples, in its order."""
        rows = torch.tensor([self.row[s] for s in sample_ids])
        return self.probs[rows.to(self.probs.device, non_blocking=True)]


def job_pseudo_labels(cfg: Config, job: Job) -> PseudoLabels:
    """The pseudo-label file of `cfg`, checked against data.unlabelled (a whole-pool job is refused: it has no fold
    whose models' labels it could take)."""
    if job.whole_pool:
        raise ConfigError("pseudo.labels: a whole-pool job has no fold whose models' labels it could take")
    ids = {ref.sample_id for url in unlabelled_urls(cfg.data.unlabelled) for ref in shard_samples(url)}
    return read_pseudo_labels(Path(cfg.pseudo.labels), ids, cfg.data.num_classes, cfg.cv.folds)


class SoftPseudoTargets:
    """A soft pseudo-label round's batch targets: the (smoothed) one-hot row of each labelled sample and fold m's
    ensemble's row of each pseudo-labelled one, kept on the training device (`pseudo.soft`)."""

    def __init__(self, labels: PseudoLabels, fold: int, settings: PseudoConfig, smoothing: float,
                 device: torch.device):  # fmt: skip
        ids, rows = labels.selected_rows(fold, settings.threshold, settings.min_votes)
        self.row = {s: i for i, s in enumerate(ids)}
        self.probs = torch.as_tensor(rows, dtype=torch.float32, device=device)
        self.classes, self.smoothing = labels.fold_probs.shape[2], smoothing

    def of(self, sample_ids: list[str], labels: torch.Tensor) -> torch.Tensor:
        """[B, C] targets of a batch whose hard labels are `labels` (a pseudo-labelled sample's is its class)."""
        from distrain.tasks.losses import smoothed_one_hot

        targets = smoothed_one_hot(labels, self.classes, self.smoothing)
        at = [(i, self.row[s]) for i, s in enumerate(sample_ids) if s in self.row]
        if at:
            batch, rows = zip(*at)
            targets[list(batch)] = self.probs[list(rows)]
        return targets
