"""Predictions of a model on this process group: each rank predicts its own shards, gathered on every rank."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Optional

import numpy as np
import torch

from distrain.data.loaders import eval_loader
from distrain.data.transforms import ImageTransform, prepare_batch
from distrain.distributed.runtime import gather_rows
from distrain.errors import JobFailure
from distrain.study.results import Predictions

if TYPE_CHECKING:
    from accelerate import Accelerator


@torch.no_grad()
def predict(
    model: torch.nn.Module,
    accelerator: Accelerator,
    urls: list[str],
    keep_ids: Optional[set[str]],
    *,
    batch_size: int,
    transform: ImageTransform,
    num_workers: int,
    cache: bool = True,
    loader: Optional[Iterable] = None,
) -> Predictions:
    """Softmax probabilities for the samples in `urls` (restricted to keep_ids), each rank predicting its own
    shards, gathered on every rank and sorted by sample id. A `loader` from `eval_loader` over the same
    samples may be passed to be reused: its persistent workers keep their decoded shards between epochs."""
    was_training = model.training
    model.eval()
    rows = []
    if loader is None:
        loader = eval_loader(urls, keep_ids, batch_size=batch_size * 2, transform=transform, num_workers=num_workers,
                             cache=cache)  # fmt: skip
    for images, labels, ids in loader:
        with accelerator.autocast():
            logits = model(prepare_batch(images.to(accelerator.device), transform, augment=False))
        probs = torch.softmax(logits.float(), dim=1).cpu().numpy()
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
