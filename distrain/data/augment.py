"""Training augmentation from timm, split as timm's prefetcher splits it.

Per sample, in the DataLoader workers (`SampleAugment`): timm's `create_transform` training transform
(random-resized crop, flips, colour jitter or auto-augment) producing uint8, with JPEGs decoded at reduced
size where the crop allows (PIL `draft`). Per batch, on the training device (`BatchAugment`): normalisation,
timm's `RandomErasing` and timm's `Mixup` / CutMix. Each sample's augmentation is seeded by (stream seed,
pass, sample id), so it does not depend on how many ranks or workers read the data, and resumes replay it.
"""

from __future__ import annotations

import contextlib
import random
import zlib
from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image

from distrain.data.transforms import ImageTransform


def _posterize(image: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """timm's posterize as Pillow < 13 ran it: 0 bits kept is a black image. Pillow 13 refuses bits outside
    [1, 8], and timm (1.0.x) still passes 0 at high RandAugment / AutoAugment magnitudes, which crashed
    `rand-m9-mstd0.5-inc1` within the first few hundred images."""
    from PIL import ImageOps

    if bits_to_keep >= 8:
        return image
    if bits_to_keep <= 0:
        return image.point(lambda _: 0)
    return ImageOps.posterize(image, bits_to_keep)


def patch_timm_posterize() -> None:
    """Install `_posterize` in timm's auto-augment op table (idempotent)."""
    from timm.data import auto_augment

    for name in ("Posterize", "PosterizeIncreasing", "PosterizeOriginal"):
        auto_augment.NAME_TO_OP[name] = _posterize


# JPEG DCT scaling: PIL's `draft` decodes at 1/2, 1/4 or 1/8 of the stored size, several times faster.
_DRAFT_FACTORS = (8, 4, 2)


class _DraftingResizedCrop:
    """timm's RandomResizedCropAndInterpolation with the JPEG decoded at the smallest DCT scale that still
    leaves the crop at least the output size (so it is never upsampled because of the draft): the crop box is
    drawn on the stored size, then scaled to the drafted image. Other formats decode at full size."""

    def __init__(self, rrc, mode: str):
        self.rrc, self.mode = rrc, mode

    def __call__(self, image: Image.Image) -> Image.Image:
        from torchvision.transforms import functional as F

        top, left, h, w = self.rrc.get_params(image, self.rrc.scale, self.rrc.ratio)
        out_h, out_w = self.rrc.size
        interpolation = self.rrc.interpolation
        if isinstance(interpolation, (tuple, list)):
            interpolation = random.choice(interpolation)
        factor = next((k for k in _DRAFT_FACTORS if h >= k * out_h and w >= k * out_w), 1)
        if factor > 1 and image.format == "JPEG":
            full_w, full_h = image.size
            image.draft(self.mode, (-(-full_w // factor), -(-full_h // factor)))
            sx, sy = image.size[0] / full_w, image.size[1] / full_h
            top, left, h, w = round(top * sy), round(left * sx), round(h * sy), round(w * sx)
        image = image.convert(self.mode)
        return F.resized_crop(image, top, left, h, w, list(self.rrc.size), interpolation)


class SampleAugment:
    """An opened (not yet decoded) image -> augmented uint8 [C, S, S] tensor, by timm's training transform for
    `transform`    (its size, channels, interpolation and mean, the fill of auto-augment) and the `augment` config."""

    def __init__(self, transform: ImageTransform, augment):
        from timm.data import create_transform

        patch_timm_posterize()  # before create_transform builds the ops
        primary, secondary, final = create_transform(
            transform.image_size, is_training=True, separate=True, use_prefetcher=True,
            scale=tuple(augment.scale), ratio=tuple(augment.ratio), hflip=augment.hflip, vflip=augment.vflip,
            color_jitter=augment.color_jitter or None, auto_augment=augment.auto_augment or None,
            interpolation=transform.interpolation, mean=transform.mean, std=transform.std,
        )  # fmt: skip
        self.mode = "L" if transform.channels == 1 else "RGB"
        crop, *rest = primary.transforms
        self.crop = _DraftingResizedCrop(crop, self.mode)
        self.rest = [*rest, *secondary.transforms]
        self.channels = transform.channels
        self.size = transform.image_size

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = self.crop(image)
        for t in self.rest:
            image = t(image)
        if image.mode != self.mode:  # some auto-augment ops return RGB for L input
            image = image.convert(self.mode)
        arr = np.asarray(image, dtype=np.uint8).reshape(self.size, self.size, self.channels)
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def sample_seed(stream_seed: int, pass_index: int, sample_id: str) -> int:
    """The augmentation seed of one sample in one pass over the data."""
    return zlib.crc32(f"{stream_seed}:{pass_index}:{sample_id}".encode())


@contextlib.contextmanager
def isolated_rng() -> Iterator[None]:
    """Run with Python's, numpy's and torch's CPU RNGs as they were on entry restored on exit, so per-sample
    seeding in the main process (num_workers=0) leaves training's random streams (dropout, Mixup) alone."""
    py, np_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(np_state)
        torch.set_rng_state(torch_state)


def seed_sample(seed: int) -> None:
    """Seed the RNGs timm's transforms draw from (random, numpy, torch) for one sample."""
    random.seed(seed)
    np.random.seed(seed)
    torch.default_generator.manual_seed(seed)  # the CPU generator only: torch.manual_seed also queues CUDA's


class BatchAugment:
    """The per-batch half on the training device: normalise, timm's RandomErasing, timm's Mixup / CutMix.
    `__call__` returns (inputs, targets): class indices (label sets: 0/1 rows), or soft targets
    [B, num_classes] when mixing (label sets: the mixed rows, smoothed towards 0.5)."""

    def __init__(self, transform: ImageTransform, augment, *, num_classes: int, label_smoothing: float, device,
                 label_sets: bool = False):  # fmt: skip
        from timm.data import Mixup
        from timm.data.random_erasing import RandomErasing

        self.transform = transform
        on = augment.enabled
        self.erase = (RandomErasing(augment.re_prob, mode=augment.re_mode, max_count=augment.re_count,
                                    device=str(device)) if on and augment.re_prob > 0 else None)  # fmt: skip
        self.mixup = None
        if augment.mixes:
            self.mixup = Mixup(mixup_alpha=augment.mixup, cutmix_alpha=augment.cutmix, prob=augment.mix_prob,
                               switch_prob=augment.switch_prob, label_smoothing=label_smoothing,
                               num_classes=num_classes, multi_label=label_sets)  # fmt: skip

    @property
    def soft_targets(self) -> bool:
        return self.mixup is not None

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.transform.normalise(images)
        if self.erase is not None:
            x = self.erase(x)
        if self.mixup is not None:
            return self.mixup(x, labels)
        return x, labels
