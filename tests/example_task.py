"""A task written against the `Task` interface alone, as a new kind of problem would be: ordered classes decided by
the expected class (the rounded mean of the probability row) rather than the argmax. Registering it is all it takes
for the config, the training loop and the ensembles to run it (tests/tasks/test_task_interface.py)."""

from __future__ import annotations

import numpy as np
import torch

from distrain.tasks import LossSettings, MetaTarget, Task


class ExpectedClass(Task):
    name = "expected_class"
    description = "ordered classes, decided by the rounded expected class"
    metrics = ("accuracy", "qwk", "log_loss")
    losses = ("ce",)

    def digits_labels(self, digits: np.ndarray):
        return [int(d) for d in digits], [str(c) for c in range(10)]

    def decide(self, probs: np.ndarray, threshold=None) -> np.ndarray:
        return np.rint(probs @ np.arange(probs.shape[-1])).astype(np.int64)

    def hard_vote(self, probs: np.ndarray) -> np.ndarray:
        return np.rint(np.median(self.decide(probs), axis=0)).astype(np.int64)  # the members' median class

    def k_of_n_decisions(self, detected: np.ndarray, mean_probs: np.ndarray) -> np.ndarray:
        """The expected class over the detected classes (over all where none is detected)."""
        kept = np.where(detected.any(axis=1, keepdims=True), np.where(detected, mean_probs, 0.0), mean_probs)
        return self.decide(kept / kept.sum(axis=1, keepdims=True))

    def true_probabilities(self, probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
        return probs[:, np.arange(len(labels)), labels]

    def meta_targets(self, num_classes: int) -> list[MetaTarget]:
        return [MetaTarget(num_classes)]

    def activate(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.softmax(dim=1)

    def create_loss(self, settings: LossSettings) -> torch.nn.Module:
        return torch.nn.CrossEntropyLoss(label_smoothing=settings.label_smoothing)  # takes soft targets too

    def batch_correct(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        expected = logits.softmax(dim=1) @ torch.arange(logits.shape[1], dtype=logits.dtype, device=logits.device)
        return (expected.round().long() == labels).sum()

    def validation_loss(self, probs: np.ndarray, labels: np.ndarray) -> float:
        return float(-np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None)).mean())
