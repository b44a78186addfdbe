"""Reading shards for one fold: per-rank and per-worker shard splits, decoding, the fold filter, batches.

Reading splits shards per rank (`split_by_node`) and per DataLoader worker (`split_by_worker`),
decodes each shard once per process (resized uint8 tensors, cached when `data.cache` is on), keeps
the samples of the wanted fold(s) by `sample_id`, and batches. Normalisation and augmentation run
per batch on the training device (`distrain.data.transforms.prepare_batch`).
"""

from __future__ import annotations

import io
import itertools
import random
from typing import Iterable, Iterator, Optional, Sequence

import torch
import webdataset as wds
from PIL import Image

from distrain.data.transforms import ImageTransform
from distrain.errors import DataError

# Decoded shards, per process: (url, transform.decode_key) -> [(sample_id, uint8 [C,H,W], label)].
# Every job of a run reads the same shards, so each is parsed and decoded once, not once per epoch.
_DECODED_SHARDS: dict[tuple, list[tuple[str, torch.Tensor, int]]] = {}


def decode_shard(url: str, transform: ImageTransform, cache: bool = True) -> list[tuple[str, torch.Tensor, int]]:
    """All samples of one shard as (sample_id, uint8 image [channels, image_size, image_size], label)."""
    key = (url, transform.decode_key)
    if key in _DECODED_SHARDS:
        return _DECODED_SHARDS[key]
    rows = []
    for sample in wds.DataPipeline(wds.SimpleShardList([url]), wds.tarfile_to_samples()):
        sid = sample["__key__"]
        ext = next((k for k in sample if k in ("png", "jpg", "jpeg", "bmp", "webp")), None)
        try:
            image = transform.decode(Image.open(io.BytesIO(sample[ext])))
        except Exception as e:
            raise DataError(f"{url}: sample {sid!r}: image cannot be decoded ({type(e).__name__})") from None
        rows.append((sid, image, int(sample["cls"])))
    if cache:
        _DECODED_SHARDS[key] = rows
    return rows


def _decoded_samples(transform: ImageTransform, cache: bool):
    def stage(shards: Iterable[dict]) -> Iterator[tuple[str, torch.Tensor, int]]:
        for shard in shards:
            yield from decode_shard(shard["url"], transform, cache)
    return stage


def _collate(rows: list[tuple[str, torch.Tensor, int]]):
    ids, images, labels = zip(*rows)
    return torch.stack(images), torch.tensor(labels, dtype=torch.long), list(ids)


def _cycled_shards(urls: Sequence[str], seed: int) -> Iterator[dict]:
    """The shard list forever, reshuffled each pass with the same seed on every rank, so that
    split_by_node hands every rank a disjoint share of each pass."""
    for epoch in itertools.count():
        order = list(urls)
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        for url in order:
            yield {"url": url}


def check_shard_count(urls: Sequence[str], world_size: int, num_workers: int, what: str) -> None:
    """Each rank x worker must own at least one shard, or it would read nothing."""
    readers = world_size * max(1, num_workers)
    if len(urls) < readers:
        raise DataError(f"{what}: {len(urls)} shards cannot feed {world_size} ranks x {max(1, num_workers)} "
                        f"workers; write smaller shards or lower data.num_workers")


def train_loader(urls: Sequence[str], keep_ids: set[str], *, batch_size: int, transform: ImageTransform,
                 num_workers: int, shuffle_buffer: int, seed: int, cache: bool = True) -> torch.utils.data.DataLoader:
    """An endless stream of training batches from this rank's shards, restricted to `keep_ids`.

    Callers take a fixed number of batches per epoch, the same on every rank, so DDP never waits
    on a rank that ran out of data.
    """
    rank, *_ = wds.utils.pytorch_worker_info()
    pipeline = wds.DataPipeline(
        lambda: _cycled_shards(urls, seed),
        wds.split_by_node,
        wds.split_by_worker,
        _decoded_samples(transform, cache),
        wds.select(lambda row: row[0] in keep_ids),
        # A distinct, reproducible shuffle stream per rank; workers get theirs from the DataLoader seed.
        wds.shuffle(shuffle_buffer, initial=min(shuffle_buffer, 100), seed=seed * 1000 + rank),
        wds.batched(batch_size, collation_fn=_collate, partial=False),
    )
    return _loader(pipeline, num_workers, seed)


def eval_loader(urls: Sequence[str], keep_ids: Optional[set[str]], *, batch_size: int, transform: ImageTransform,
                num_workers: int, cache: bool = True) -> torch.utils.data.DataLoader:
    """One pass over this rank's share of `urls` (all of it in one process), each sample exactly once."""
    stages = [wds.SimpleShardList(list(urls)), wds.split_by_node, wds.split_by_worker,
              _decoded_samples(transform, cache)]
    if keep_ids is not None:
        stages.append(wds.select(lambda row: row[0] in keep_ids))
    stages.append(wds.batched(batch_size, collation_fn=_collate, partial=True))
    return _loader(wds.DataPipeline(*stages), num_workers, seed=0)


def _loader(pipeline, num_workers: int, seed: int) -> torch.utils.data.DataLoader:
    g = torch.Generator()
    g.manual_seed(seed)
    return torch.utils.data.DataLoader(pipeline, batch_size=None, num_workers=num_workers, generator=g,
                                       persistent_workers=num_workers > 0)
