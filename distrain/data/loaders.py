"""Reading shards for one fold: per-rank and per-worker shard splits, the fold filter, decoding, batches.

Each pass over the shard list (reshuffled per pass for training) is split by rank (`split_by_node`) and by
DataLoader worker (`split_by_worker`). A shard becomes (offset, size) records of the samples wanted
(`distrain.data.shards`): samples outside the fold are never read. Training shuffles records, not images, in
its buffer, and can start at any batch without decoding the ones before it (resume). Only then is each
sample read and decoded, in the worker: `ImageTransform.decode` for evaluation, timm's training transform
(`SampleAugment`) for training. Normalisation, random erasing and Mixup run per batch on the device.
Nothing decoded is kept between batches, so memory does not grow with the data set.
"""

from __future__ import annotations

import atexit
import ctypes
import io
import itertools
import random
import signal
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Optional

import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader

from distrain.data.augment import SampleAugment, isolated_rng, sample_seed, seed_sample
from distrain.data.shards import SampleRef, read_image, shard_samples
from distrain.data.transforms import ImageTransform
from distrain.errors import DataError

Batch = tuple[torch.Tensor, torch.Tensor, list[str]]  # uint8 images [B, C, S, S], labels [B] (or targets), ids
Decoder = Callable[[SampleRef, int], torch.Tensor]  # (sample, pass over the data) -> uint8 [C, S, S]
"""A dense task's decoder returns (image, target) instead (`distrain.data.dense`): its targets replace the labels."""

# Evaluation-decoded images, per process: (shard, sample id, transform.decode_key) -> uint8 tensor. Filled only
# when the whole data set fits in data.cache_mb (`fits_in_cache`): every job of a run reads the same shards.
_DECODED: dict[tuple, torch.Tensor] = {}


def _records(labels: Optional[dict[str, int]]):
    """Shards -> (ref, label, pass) records of the samples in `labels` (all samples, label -1, when None)."""

    def stage(shards: Iterable[dict]) -> Iterator[tuple[SampleRef, int, int]]:
        for shard in shards:
            for ref in shard_samples(shard["url"]):
                if labels is None:
                    yield ref, -1, shard["pass"]
                elif ref.sample_id in labels:
                    yield ref, labels[ref.sample_id], shard["pass"]

    return stage


def _decoded(decode: Decoder):
    """Batches of records -> (uint8 images, labels, ids); decoding errors name the shard and the sample."""

    def stage(batches: Iterable[list]) -> Iterator[Batch]:
        for rows in batches:
            images, targets = [], []
            with isolated_rng():
                for ref, _label, pass_index in rows:
                    try:
                        decoded = decode(ref, pass_index)
                    except DataError:
                        raise
                    except Exception as e:
                        raise DataError(f"{ref.where()}: image cannot be decoded ({type(e).__name__}: {e})") from None
                    if isinstance(decoded, tuple):  # a dense sample: its target replaces the index's label
                        decoded, target = decoded
                        targets.append(target)
                    images.append(decoded)
            labels = torch.stack(targets) if targets else torch.tensor([r[1] for r in rows], dtype=torch.long)
            yield torch.stack(images), labels, [r[0].sample_id for r in rows]
            if torch.utils.data.get_worker_info() is not None:
                release_freed_memory()  # in a worker only: in the training process it would hand back the memory
                # the next step's tensors are about to reuse (training throughput fell by a third)

    return stage


def _malloc_trim() -> Callable[[], object]:
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return lambda: None
    trim.argtypes = [ctypes.c_size_t]
    return lambda: trim(0)


# Decoding images of varied sizes leaves glibc's heap fragmented, and it keeps the freed pages: a worker's
# RSS grew with every image it decoded (514 -> 653 MiB from 1,600 to 6,400 images of about 500x375). Handing
# freed memory back after every batch keeps it flat (486 -> 487 MiB) at a small cost per batch.
release_freed_memory = _malloc_trim()


def fits_in_cache(n_samples: int, transform: ImageTransform, cache_mb: float) -> bool:
    """Whether `n_samples` evaluation-decoded images fit in `cache_mb` megabytes."""
    return n_samples * transform.channels * transform.image_size**2 <= cache_mb * 1e6


def eval_decoder(transform: ImageTransform, cache: bool = False) -> Decoder:
    """Decode for evaluation and prediction: resize and centre crop, no randomness. With `cache`, each image is
    read and decoded once per process (see `fits_in_cache`)."""

    def decode(ref: SampleRef, _pass_index: int) -> torch.Tensor:
        key = (ref.url, ref.sample_id, transform.decode_key)
        if cache and key in _DECODED:
            return _DECODED[key]
        image = _channels_stacked([transform.decode(img) for img in _images(ref)])
        if cache:
            _DECODED[key] = image
        return image

    return decode


def train_decoder(transform: ImageTransform, augment, stream_seed: int, cache: bool = False) -> Decoder:
    """Decode for training: timm's augmentation seeded per (stream seed, pass, sample), or the eval transform
    (cached as `eval_decoder`) when augmentation is off."""
    if not augment.enabled:
        return eval_decoder(transform, cache)
    sample_augment = SampleAugment(transform, augment)

    def decode(ref: SampleRef, pass_index: int) -> torch.Tensor:
        seed_sample(sample_seed(stream_seed, pass_index, ref.sample_id))
        return _channels_stacked([sample_augment(img) for img in _images(ref)])  # a pair: each its own draw

    return decode


def _images(ref: SampleRef) -> list[Image.Image]:
    """The sample's image, or an image pair's two."""
    return [Image.open(io.BytesIO(read_image(ref, second))) for second in ((False, True) if ref.second else (False,))]


def _channels_stacked(images: list[torch.Tensor]) -> torch.Tensor:
    """One image [C, H, W], or a pair's two as one [2C, H, W] tensor: everything after decoding (normalising,
    random erasing, Mixup / CutMix, TTA, the model's input) then treats the pair as one sample."""
    return images[0] if len(images) == 1 else torch.cat(images, dim=0)


def _cycled_shards(urls: Sequence[str], seed: int) -> Iterator[dict]:
    """The shard list forever, reshuffled each pass with the same seed on every rank, so that
    split_by_node hands every rank a disjoint share of each pass."""
    for pass_index in itertools.count():
        order = list(urls)
        random.Random(seed * 1_000_003 + pass_index).shuffle(order)
        for url in order:
            yield {"url": url, "pass": pass_index}


def _reader(start_batch: int) -> tuple[int, int, int]:
    """(rank, worker, num_workers) of this reader, the worker as the stream's worker: the DataLoader takes
    batch i from worker i % num_workers, so in a stream resumed at `start_batch` worker w does the part of
    worker (w + start_batch) % num_workers of the stream begun at 0."""
    rank, _world, worker, num_workers = wds.utils.pytorch_worker_info()
    num_workers = max(1, num_workers)
    return rank, (worker + start_batch) % num_workers, num_workers


def _split_by_worker(start_batch: int):
    def stage(shards: Iterable[dict]) -> Iterator[dict]:
        _rank, worker, num_workers = _reader(start_batch)
        return itertools.islice(shards, worker, None, num_workers)

    return stage


def _shuffle(bufsize: int, seed: int, start_batch: int):
    """A shuffle buffer of records with its own reproducible order per rank and worker."""

    def stage(records: Iterable) -> Iterator:
        rank, worker, _ = _reader(start_batch)
        return wds.shuffle(bufsize, initial=min(bufsize, 100), seed=(seed * 1000 + rank) * 1000 + worker)(records)

    return stage


def _skip_batches(start_batch: int):
    """Drop this worker's share of the stream's first `start_batch` batches, without decoding them."""

    def stage(batches: Iterable[list]) -> Iterator[list]:
        _rank, worker, num_workers = _reader(start_batch)
        return itertools.islice(batches, len(range(worker, start_batch, num_workers)), None)

    return stage


def check_shard_count(urls: Sequence[str], world_size: int, num_workers: int, what: str) -> None:
    """Each rank x worker must own at least one shard, or it would read nothing."""
    readers = world_size * max(1, num_workers)
    if len(urls) < readers:
        raise DataError(
            f"{what}: {len(urls)} shards cannot feed {world_size} ranks x {max(1, num_workers)} "
            f"workers; write smaller shards or lower data.num_workers"
        )


def default_workers(requested: int, n_shards: int, world_size: int, cpus_per_process: int) -> int:
    """data.num_workers, with -1 resolved to this process's share of the node's CPUs, at most as many as
    there are shards per rank (a worker without a shard would read nothing)."""
    if requested >= 0:
        return requested
    return max(0, min(cpus_per_process, n_shards // max(1, world_size)))


def train_loader(urls: Sequence[str], labels: dict[str, int], *, batch_size: int, decode: Decoder,
                 num_workers: int, shuffle_buffer: int, seed: int, start_batch: int = 0) -> DataLoader:  # fmt: skip
    """An endless stream of training batches from this rank's shards, restricted to the samples in `labels`
    (sample id -> class), beginning at batch `start_batch` of the stream; in pinned memory when a GPU is there.

    Callers take a fixed number of batches per epoch, the same on every rank, so DDP never waits
    on a rank that ran out of data.
    """
    pipeline = wds.DataPipeline(
        lambda: _cycled_shards(urls, seed),
        wds.split_by_node,
        _split_by_worker(start_batch),
        _records(labels),
        _shuffle(shuffle_buffer, seed, start_batch),
        wds.batched(batch_size, collation_fn=list, partial=False),
        _skip_batches(start_batch),
        _decoded(decode),
    )
    return _loader(pipeline, num_workers, seed, torch.cuda.is_available())


def eval_loader(urls: Sequence[str], labels: Optional[dict[str, int]], *, batch_size: int, transform: ImageTransform,
                num_workers: int, pin_memory: bool = False, cache: bool = False,
                decode: Optional[Decoder] = None) -> DataLoader:  # fmt: skip
    """One pass over this rank's share of `urls` (all of it in one process), each sample of `labels` exactly
    once (every sample, with label -1, when `labels` is None). `decode`: a dense task's (default: the transform's
    `eval_decoder`)."""
    pipeline = wds.DataPipeline(
        lambda: iter([{"url": url, "pass": 0} for url in urls]),
        wds.split_by_node,
        wds.split_by_worker,
        _records(labels),
        wds.batched(batch_size, collation_fn=list, partial=True),
        _decoded(decode or eval_decoder(transform, cache)),
    )
    return _loader(pipeline, num_workers, 0, pin_memory)


class _Loader(DataLoader):
    """A DataLoader whose DataErrors from a worker keep their one-line message: torch re-raises a worker's
    exception with the worker's whole traceback as the message."""

    def __iter__(self):
        try:
            yield from super().__iter__()
        except DataError as e:
            lines = [line for line in str(e).splitlines() if line.strip()]
            raise DataError(lines[-1].removeprefix(f"{DataError.__module__}.DataError: ")) from None


def _loader(pipeline, num_workers: int, seed: int, pin_memory: bool) -> DataLoader:
    g = torch.Generator()
    g.manual_seed(seed)
    if num_workers > 0 and not _EXIT_HOOK:
        _EXIT_HOOK.append(atexit.register(_kill_workers_left))
    return _Loader(pipeline, batch_size=None, num_workers=num_workers, generator=g, worker_init_fn=_ignore_sigterm,
                   persistent_workers=num_workers > 0, pin_memory=pin_memory)  # fmt: skip


def _ignore_sigterm(worker_id: int) -> None:
    """DataLoader workers leave SIGTERM to the trainer. A preemption reaches them too (a signal to the process group
    from `distrain schedule` or `tini -g`; accelerate's launcher forwards SIGTERM to every descendant): a worker that
    died of it failed the job ("DataLoader worker ... killed by signal: Terminated") before the trainer could save its
    state. The trainer stops its workers itself; one whose trainer died notices and exits (torch's watchdog)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


_EXIT_HOOK: list = []


def _kill_workers_left() -> None:
    """At exit, before multiprocessing's own exit handler: SIGKILL the daemonic children (loader workers whose
    iterator is still alive). That handler terminates them with SIGTERM, which they ignore, and then waits for them
    for good."""
    import multiprocessing

    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's handler would report each as "killed by signal"
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()
