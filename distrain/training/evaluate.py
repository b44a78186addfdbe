"""Predictions of a model on this process group: each rank predicts its own shards, gathered on every rank."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import numpy as np
import torch

from distrain.data.transforms import ImageTransform, TestTimeAugment
from distrain.distributed.runtime import gather_rows
from distrain.errors import DataError, JobFailure
from distrain.study.results import Predictions

if TYPE_CHECKING:
    from accelerate import Accelerator


@torch.no_grad()
def predict(
    model: torch.nn.Module,
    accelerator: Accelerator,
    loader: Iterable,
    transform: ImageTransform,
    tta: TestTimeAugment,
    activate: Callable[[torch.Tensor], torch.Tensor],
    stop: Callable[[], bool] = lambda: False,
) -> Predictions:
    """The task's probabilities (`activate`: `Task.activate`; averaged over the `tta` views) for the samples of `loader`
    (an `eval_loader`: this rank's share of the shards), gathered on every rank and sorted by sample id. A loader
    built once can be reused every epoch: its persistent workers stay up. `stop()` turning true ends this rank's
    pass early (the caller then stops; what was gathered is incomplete)."""
    was_training = model.training
    model.eval()
    rows = []
    for images, labels, ids in loader:
        if stop():
            break
        with accelerator.autocast():
            probs = tta.probs(model, transform.normalise(images.to(accelerator.device)), activate).cpu().numpy()
        rows.extend(zip(ids, probs, labels.numpy()))  # a class index, a 0/1 row, or a dense task's label row
    model.train(was_training)
    rows = gather_rows(accelerator, rows)
    rows.sort(key=lambda r: r[0])
    if not rows:
        return Predictions([], np.zeros((0, 0), np.float32), np.zeros(0, np.int64))
    return Predictions(
        sample_ids=[r[0] for r in rows],
        probs=np.stack([r[1] for r in rows]).astype(np.float32),
        labels=np.stack([r[2] for r in rows]),
    )


def check_coverage(pred: Predictions, expected: set[str], what: str) -> None:
    """Every expected sample predicted exactly once: no padding duplicates, nothing dropped. Samples the index
    lists but no shard holds (or the reverse) are a data problem that every attempt would meet: DataError."""
    found = set(pred.sample_ids)
    if found != expected:
        missing, extra = sorted(expected - found), sorted(found - expected)
        example = f"{missing[0]!r} is in index.json but in no shard" if missing else f"{extra[0]!r} is in no index"
        raise DataError(
            f"{what}: the shards hold {len(found & expected)} of the {len(expected)} samples index.json lists "
            f"({len(missing)} missing, {len(extra)} unknown; {example}): a shard was truncated, replaced or "
            f"re-packed without its index; pack the data again"
        )
    if len(pred.sample_ids) != len(found):
        raise JobFailure(
            f"{what}: predicted {len(pred.sample_ids)} rows for {len(expected)} samples "
            f"({len(found)} distinct): rows predicted twice"
        )
