"""Predictions of a model on this process group: each rank predicts its own shards, gathered on every rank."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np
import torch

from distrain.data.transforms import ImageTransform, TestTimeAugment
from distrain.distributed.runtime import gather_rows
from distrain.errors import JobFailure
from distrain.study.results import Predictions

if TYPE_CHECKING:
    from accelerate import Accelerator


@torch.no_grad()
def predict(
    model: torch.nn.Module,
    accelerator: Accelerator,
    loader: Iterable,
    transform: ImageTransform,
    tta: TestTimeAugment = TestTimeAugment(),
    multilabel: bool = False,
) -> Predictions:
    """Softmax probabilities (multilabel: sigmoids; averaged over the `tta` views) for the samples of `loader`
    (an `eval_loader`: this rank's share of the shards), gathered on every rank and sorted by sample id. A loader
    built once can be reused every epoch: its persistent workers stay up."""
    was_training = model.training
    model.eval()
    rows = []
    for images, labels, ids in loader:
        with accelerator.autocast():
            probs = tta.probs(model, transform.normalise(images.to(accelerator.device)), multilabel).cpu().numpy()
        rows.extend(zip(ids, probs, labels.tolist()))
    model.train(was_training)
    rows = gather_rows(accelerator, rows)
    rows.sort(key=lambda r: r[0])
    if not rows:
        return Predictions([], np.zeros((0, 0), np.float32), np.zeros(0, np.int64))
    return Predictions(
        sample_ids=[r[0] for r in rows],
        probs=np.stack([r[1] for r in rows]).astype(np.float32),
        labels=np.asarray([r[2] for r in rows], dtype=np.int64),
    )


def check_coverage(pred: Predictions, expected: set[str], what: str) -> None:
    """Every expected sample predicted exactly once: no padding duplicates, nothing dropped."""
    if len(pred.sample_ids) != len(set(pred.sample_ids)) or set(pred.sample_ids) != expected:
        raise JobFailure(
            f"{what}: predicted {len(pred.sample_ids)} rows for {len(expected)} samples "
            f"({len(set(pred.sample_ids))} distinct); shards and index disagree"
        )
