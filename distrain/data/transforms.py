"""The one definition of how an image becomes model input, shared by training, evaluation, test prediction
and serving: an `ImageTransform` (resolved per backbone from timm's data config, overridable under `data:`)
decodes images to uint8 (`decode`: colour mode, resize keeping the aspect ratio, centre crop, as timm's eval
transform does) and normalises batches on the device (`normalise`). Training augmentation: `distrain.data.augment`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image

from distrain.config.lookups import is_factory_name
from distrain.errors import ConfigError

INTERPOLATIONS = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC,
                  "lanczos": Image.LANCZOS}  # fmt: skip


@dataclass(frozen=True)
class ImageTransform:
    """How one backbone sees an image: `image_size` square, `channels`, resized with `interpolation` so that
    the shorter side is image_size / crop_pct, centre-cropped, then (x / 255 - mean) / std per channel."""

    image_size: int
    channels: int
    interpolation: str = "bilinear"
    crop_pct: float = 1.0
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)

    @property
    def decode_key(self) -> tuple:
        """What decoding depends on (normalisation happens later, per batch)."""
        return self.image_size, self.channels, self.interpolation, self.crop_pct

    def decode(self, image: Image.Image) -> torch.Tensor:
        """A PIL image of any size as uint8 [channels, image_size, image_size]. A JPEG at least twice the size it is
        resized to is decoded at a reduced DCT scale (PIL's `draft`: 1/2, 1/4 or 1/8, never below that size)."""
        mode = "L" if self.channels == 1 else "RGB"
        if image.format == "JPEG":
            w, h = image.size
            scale = self.image_size / self.crop_pct / min(w, h)
            if scale <= 0.5:
                image.draft(mode, (math.ceil(w * scale), math.ceil(h * scale)))
        image = image.convert(mode)
        w, h = image.size
        scale = self.image_size / self.crop_pct / min(w, h)
        resized = (max(self.image_size, round(w * scale)), max(self.image_size, round(h * scale)))
        if resized != (w, h):
            image = image.resize(resized, INTERPOLATIONS[self.interpolation])
        left, top = (resized[0] - self.image_size) // 2, (resized[1] - self.image_size) // 2
        if resized != (self.image_size, self.image_size):
            image = image.crop((left, top, left + self.image_size, top + self.image_size))
        arr = np.asarray(image, dtype=np.uint8).reshape(self.image_size, self.image_size, self.channels)
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, C, H, W] -> float (x / 255 - mean) / std, computed as x / (255 std) - mean / std; an image
        pair's [B, 2C, H, W] with the statistics once per image."""
        per_image = images.shape[1] // max(1, len(self.mean)) if len(self.mean) > 1 else 1
        scale, shift = _scale_and_shift(tuple(self.mean) * per_image, tuple(self.std) * per_image, images.device)
        return images.float().div_(scale).sub_(shift)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ImageTransform:
        return cls(**{**d, "mean": tuple(d["mean"]), "std": tuple(d["std"])})


@dataclass(frozen=True)
class TestTimeAugment:
    """Views of a normalised batch whose softmax probabilities are averaged: the batch itself, its mirror
    images (`hflip`, `vflip`) and the batch resized by each of `scales` (bilinear; the backbone must take other
    input sizes, as CNNs with global pooling do). The same for OOF, test, `distrain predict` and the pyfunc."""

    hflip: bool = False
    vflip: bool = False
    scales: tuple[float, ...] = ()

    def views(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = [x]
        if self.hflip:
            out.append(x.flip(-1))
        if self.vflip:
            out.append(x.flip(-2))
        for s in self.scales:
            size = max(8, round(x.shape[-1] * s))
            out.append(torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False))
        return out

    def probs(
        self, model: torch.nn.Module, x: torch.Tensor, activate: Callable[[torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        """The task's probabilities of `model` (`activate`: logits -> probabilities, `Task.activate`), averaged over
        the views (fp32)."""
        views = self.views(x)
        total = activate(model(views[0]).float())
        for view in views[1:]:
            total += activate(model(view).float())
        return total / len(views)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> TestTimeAugment:
        return cls(d["hflip"], d["vflip"], tuple(d["scales"])) if d else cls()


def resolve_transform(model_name: str, data, channels: int, model: torch.nn.Module | None = None) -> ImageTransform:
    """The transform of `model_name` on this data: `data.interpolation`, `data.crop_pct`, `data.mean` and
    `data.std` where set, else the model's timm pretrained config (mean and std averaged to one channel for
    grayscale data), else ImageNet's statistics, bicubic and a 0.875 crop. `data` is the config's DataConfig. A
    factory's network (`package.module:function`) has no config in timm's registry: its own `pretrained_cfg` or
    `default_cfg` attribute is used, if `model`, the network built, has one. Raises ConfigError for a mean/std of
    the wrong length."""
    cfg = _model_data_config(model_name, model)
    mean = tuple(data.mean) or tuple(cfg.get("mean") or (0.485, 0.456, 0.406))
    std = tuple(data.std) or tuple(cfg.get("std") or (0.229, 0.224, 0.225))
    for key, value in (("data.mean", mean), ("data.std", std)):
        if len(value) not in (1, channels) and not (channels == 1 and len(value) == 3):
            raise ConfigError(f"{key}: {len(value)} values for {channels}-channel images (give 1 or {channels})")
    if channels == 1:  # RGB statistics for grayscale input: their average, as the folded first conv sees it
        mean, std = (float(np.mean(mean)),), (float(np.mean(std)),)
    elif len(mean) == 1 or len(std) == 1:
        mean, std = mean * (channels // len(mean)), std * (channels // len(std))
    interpolation = data.interpolation or cfg.get("interpolation") or "bicubic"
    crop_pct = data.crop_pct or cfg.get("crop_pct") or 0.875
    return ImageTransform(data.image_size, channels, interpolation, float(crop_pct), mean, std)


def _model_data_config(model_name: str, model: torch.nn.Module | None) -> dict:
    """timm's pretrained config of a timm name, or the one a factory's network carries (as timm's own do); {}."""
    if not is_factory_name(model_name):
        import timm

        found = timm.models.get_pretrained_cfg(model_name)
    else:
        found = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if found is None:
        return {}
    return found.to_dict() if hasattr(found, "to_dict") else dict(found)


@functools.lru_cache(maxsize=64)
def _scale_and_shift(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> tuple[torch.Tensor, ...]:
    """`normalise`'s constants, made on the device once: a tensor built from a list on a GPU is a synchronising
    host-to-device copy, which twice per batch stalled the step."""
    scale = torch.tensor([255.0 * s for s in std], device=device).view(1, -1, 1, 1)
    shift = torch.tensor([m / s for m, s in zip(mean, std)], device=device).view(1, -1, 1, 1)
    return scale, shift
