"""data.unlabelled: a directory of `.tar` shards of images without (or with ignored) labels, which a pseudo-label
round adds to its training samples. Checked before any work: it must be a shard directory other than the study's
own data, share no sample id with it (its CV or holdout images would train under a guessed label) and hold
samples of the same shape (channels, images per sample)."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image

from distrain.data.index import DatasetIndex
from distrain.data.shards import read_image, shard_samples
from distrain.errors import ConfigError


def unlabelled_urls(directory: str | Path) -> list[str]:
    """The `.tar` shards under `directory`, sorted; ConfigError when there are none."""
    root = Path(directory)
    if not root.is_dir():
        raise ConfigError(f"data.unlabelled: {root} is not a directory")
    urls = sorted(str(p) for p in root.rglob("*.tar"))
    if not urls:
        raise ConfigError(f"data.unlabelled: {root} holds no .tar shards (pack the images with `distrain data pack`)")
    return urls


def check_unlabelled(directory: str | Path, index: DatasetIndex) -> list[str]:
    """The unlabelled sample ids, once data.unlabelled fits the study's data set (`index`); ConfigError naming what
    does not."""
    root = Path(directory)
    if root.resolve() == index.root.resolve():
        raise ConfigError(f"data.unlabelled: {root} is data.root itself: its images are labelled")
    refs = [ref for url in unlabelled_urls(root) for ref in shard_samples(url)]
    if not refs:
        raise ConfigError(f"data.unlabelled: {root} holds shards without samples")
    ids = [ref.sample_id for ref in refs]
    shared = sorted(set(ids) & set(index.sample_ids))
    if shared:
        raise ConfigError(f"data.unlabelled: {root} shares {len(shared)} sample id(s) with data.root (e.g. "
                          f"{shared[0]}): its CV or holdout images would train as pseudo-labels")  # fmt: skip
    first = refs[0]
    pairs = 2 if first.second else 1
    if pairs != index.images_per_sample:
        raise ConfigError(f"data.unlabelled: {root} has {pairs} image(s) per sample, data.root "
                          f"{index.images_per_sample}")  # fmt: skip
    channels = len(Image.open(io.BytesIO(read_image(first))).getbands())
    if channels != index.channels:
        raise ConfigError(f"data.unlabelled: {root} has {channels}-channel images ({first.where()}), data.root "
                          f"{index.channels}")  # fmt: skip
    return ids
