"""The Task interface: everything that differs between kinds of problem, behind one declared set of methods.

The plan, the ledger, the training loop, the distributed code, the OOF store, the ensembles and MLflow talk to a
task only through `Task`; no module outside `distrain/tasks/` names one (tests/test_layering.py). Adding a task is
a module with a `Task` subclass and a `register_task` call (see tests/example_task.py).

A task's predictions are rows of numbers per sample: a probability vector [C] for one-of-C tasks, independent
probabilities [L] for label-set tasks. Its labels are what `labels_of` hands out: a class index or a 0/1 row.
Torch-side hooks take tensors and use only tensor methods, or import torch where they run: the torch-free
layers (config, study, ensembles) and `distrain sync` import the tasks without it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Optional, Union

import numpy as np

from distrain.tasks.metrics import METRICS, Threshold, score_labels, score_probabilities

if TYPE_CHECKING:
    import torch

Label = Union[int, tuple[int, ...]]
"""A sample's label as `index.json` keeps it: a class index, or for a label-set task its classes' indices."""

COMPARISONS = ("abs_diff", "concat", "product", "cosine", "l2", "residual")
"""How a pair task's siamese head may compare the two embeddings (`model.comparison`; `distrain.tasks.siamese`)."""

LABEL_SETS_KEY = "multilabel"
"""The `index.json` key that marks a data set whose labels are sets of classes (the name predates tasks)."""


@dataclass(frozen=True)
class LossSettings:
    """The train section's loss settings (the config checked that they fit the task)."""

    name: str
    label_smoothing: float = 0.0
    focal_gamma: float = 2.0
    focal_alpha: float = 0.0
    pos_weight: float = 1.0


@dataclass(frozen=True)
class HeadSettings:
    """The model section's settings of what a task puts on the network: how a pair task's siamese head compares
    the two embeddings (`model.comparison`), the channels of a dense task's neck and head (`model.neck_channels`)."""

    comparison: tuple[str, ...] = ()
    neck_channels: int = 256


@dataclass(frozen=True)
class MetaTarget:
    """One LightGBM meta-model target of stacking, with `classes` values: the labels themselves, whose
    probabilities fill every output column (`column` None), or label column `column` of 0/1 label rows, whose
    p(1) fills output column `column`."""

    classes: int
    column: Optional[int] = None

    def labels(self, labels: np.ndarray) -> np.ndarray:
        return labels if self.column is None else labels[:, self.column]


class Task(ABC):
    """What is trained and how its predictions are scored, combined and served. Subclasses set the class
    attributes and implement the abstract hooks; the base holds what tasks share."""

    name: ClassVar[str]
    metrics: ClassVar[tuple[str, ...]]
    """The `train.metric` values that fit the task."""
    losses: ClassVar[tuple[str, ...]]
    """The `train.loss` values that fit the task."""
    label_sets: ClassVar[bool] = False
    """A sample's label is a set of classes (a 0/1 row over them), not one class index."""
    weights_positives: ClassVar[bool] = False
    """The task has a positive class (or positives per label) that `train.focal_alpha` weights."""
    argmax_decisions: ClassVar[bool] = False
    """Decisions at the default rule are the argmax of the probability rows, and labels are class indices (the
    ensembles then take numpy fast paths)."""
    tunes_thresholds: ClassVar[bool] = False
    """Its decisions are thresholds on probabilities, tuned on the OOF predictions."""
    images_per_sample: ClassVar[int] = 1
    """Images a sample holds (2 for an image pair); the loaders hand them to the model stacked on channels."""
    digits_source: ClassVar[Optional[str]] = None
    """The `data.source` of the bundled demo data labelled for this task (scikit-learn's digits), if any."""
    annotation: ClassVar[str] = ""
    """What a sample carries besides its image(s) and label, as its shard member's extension: "" nothing (the label
    is the target), "json" the text regions of a detection sample, "mask.png" a segmentation mask. A dense task's
    loaders decode it into the training target and the evaluation label row, and its predictions are maps
    (`dense`)."""
    description: ClassVar[str]

    @property
    def dense(self) -> bool:
        """Its samples carry annotations and its predictions are per-pixel maps, not rows of class probabilities:
        no Mixup / CutMix, random erasing or TTA; its ensembles are its own (`distrain.ensembles.dense`, `.masks`)."""
        return bool(self.annotation)

    # -- configuration and data --------------------------------------------------------------------------------

    def config_problems(self, num_classes: int) -> list[str]:
        """What is wrong with `data.num_classes` for this task (default: fewer than 2 classes)."""
        return [] if num_classes >= 2 else [f"data.num_classes: invalid value {num_classes} (expected >= 2)"]

    @abstractmethod
    def digits_labels(self, digits: np.ndarray) -> tuple[list[Label], list[str]]:
        """The demo labels of scikit-learn's digits (0..9 per image) for this task, and the class names."""

    def strata(self, labels: np.ndarray, min_count: int) -> np.ndarray:
        """One stratum per sample for stratified splits (folds, the holdout); each stratum keeps `min_count`
        samples where it can. One-of-C tasks: the class."""
        return labels

    def fold_strata(self, labels: np.ndarray, n_folds: int) -> np.ndarray:
        """`strata` for K-fold splits; DataError when the labels cannot fill `n_folds` folds."""
        return self.strata(labels, n_folds)

    # -- predictions (numpy) -----------------------------------------------------------------------------------

    @abstractmethod
    def decide(self, probs: np.ndarray, threshold: Threshold = None) -> np.ndarray:
        """Decisions of probability rows: at the default rule, or at tuned thresholds."""

    def score(self, metric: str, labels: np.ndarray, probs: np.ndarray, threshold: Threshold = None) -> float:
        """The metric of probability rows: a probability metric on them, a decision metric on `decide`'s output."""
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r}")
        if METRICS[metric].on_probabilities:
            return score_probabilities(metric, labels, probs)
        return score_labels(metric, labels, self.decide(probs, threshold))

    def score_decisions(self, metric: str, labels: np.ndarray, decisions: np.ndarray) -> float:
        """A decision metric of decisions (hard and k-of-n votes give no probabilities)."""
        return score_labels(metric, labels, decisions)

    @abstractmethod
    def hard_vote(self, probs: np.ndarray) -> np.ndarray:
        """Majority vote of M members' decisions, probs [M, n, C] -> decisions."""

    @abstractmethod
    def k_of_n_decisions(self, detected: np.ndarray, mean_probs: np.ndarray) -> np.ndarray:
        """Decisions from 'at least k of n members' detections [n, C] (the members' mean probabilities beside)."""

    @abstractmethod
    def true_probabilities(self, probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """[M, n, C] member probabilities -> [M, r]: each member's probability of every true outcome (the
        likelihood that vote weights maximise; linear in the weights)."""

    def tune_threshold(self, metric: str, labels: np.ndarray, probs: np.ndarray) -> Any:
        """The decision threshold(s) scoring `metric` best on these rows (JSON-compatible), for a task that
        `tunes_thresholds`."""
        raise NotImplementedError(f"task {self.name} has no decision thresholds")

    @abstractmethod
    def meta_targets(self, num_classes: int) -> list[MetaTarget]:
        """What stacking's meta-models learn: one target (the class) or one per label."""

    # -- training (torch) --------------------------------------------------------------------------------------

    def build_model(
        self, make: Callable[..., torch.nn.Module], num_classes: int, in_chans: int, head: HeadSettings = HeadSettings()
    ) -> torch.nn.Module:
        """The network for this task from `make(num_classes=, in_chans=)` (a timm model or a factory's, by name;
        `in_chans` per image) and the `head` settings. Default: the network itself."""
        return make(num_classes=num_classes, in_chans=in_chans)

    @abstractmethod
    def activate(self, logits: torch.Tensor) -> torch.Tensor:
        """The model's logits [B, C] as the task's probability rows."""

    @abstractmethod
    def create_loss(self, settings: LossSettings) -> torch.nn.Module:
        """The training loss `settings.name` names; it takes hard labels and Mixup / CutMix soft targets."""

    def distillation_loss(self, logits: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
        """The soft-target loss of the model's logits against a teacher's probability rows at `temperature`
        (`distill.*`). Tasks without one (a dense task's maps) refuse distillation in the config."""
        raise NotImplementedError(f"task {self.name} has no soft-target loss")

    @abstractmethod
    def batch_correct(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """How many samples of a batch are decided right at the default rule (a 0-dim tensor, no host sync)."""

    @abstractmethod
    def validation_loss(self, probs: np.ndarray, labels: np.ndarray) -> float:
        """The loss of predicted probability rows (for logs and the gap-aware stop)."""
