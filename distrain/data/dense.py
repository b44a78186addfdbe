"""Decoding dense samples (text detection): a shard's image and its words, as the network's input and DB targets.

Training: one random affine (`tasks.detection.augment`) to a size x size crop, then the DB targets of the moved
polygons; seeded per (stream, pass, sample) as classification's augmentation, so a resumed job draws the same
crops. Evaluation: the whole image fitted into a size x size canvas (`fit_canvas`), so every prediction map has
one shape and the OOF store can keep fixed-size rows; the scale maps predicted boxes back to the image's
pixels."""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from distrain.data.augment import sample_seed
from distrain.data.masks import MASK_EXT
from distrain.data.shards import SampleRef, read_annotation, read_image
from distrain.errors import DataError
from distrain.tasks.detection.augment import GeometricSettings, augment, fit_canvas, scaled
from distrain.tasks.detection.geometry import TextRegions
from distrain.tasks.detection.targets import MIN_TEXT_SIZE, db_targets
from distrain.tasks.detection.task import BACKGROUND, DONT_CARE, TEXT, map_side
from distrain.tasks.semantic import fit_mask, grid_side, label_grid

DenseDecoder = Callable[[SampleRef, int], tuple[torch.Tensor, torch.Tensor]]
"""(sample, pass over the data) -> (uint8 image [3, S, S], the sample's target or label row)."""


def text_regions(annotation: bytes) -> TextRegions:
    """The words of a packed detection sample (`{"words": [{"points", "text", "ignore"}]}`)."""
    return TextRegions.from_json(annotation)


def _rgb(ref: SampleRef) -> np.ndarray:
    with Image.open(io.BytesIO(read_image(ref))) as image:
        return np.asarray(image.convert("RGB"))


@dataclass(frozen=True)
class DetectionSample:
    """A decoded sample: uint8 image [3, S, S], DB targets [4, S, S], and the scale from image to canvas pixels."""

    image: torch.Tensor
    targets: torch.Tensor
    scale: float


def eval_detection_sample(ref: SampleRef, size: int) -> DetectionSample:
    """The evaluation decoding: the whole image on a size x size canvas, its words scaled alike."""
    if size % 32:
        raise DataError(f"detection images are decoded at sides that are multiples of 32, got {size}")
    canvas, scale = fit_canvas(_rgb(ref), size)
    words = text_regions(read_annotation(ref))
    return DetectionSample(torch.from_numpy(canvas).permute(2, 0, 1).contiguous(),
                           torch.from_numpy(_targets(scaled(words, scale), size)), scale)  # fmt: skip


def train_detection_sample(ref: SampleRef, size: int, stream_seed: int, pass_index: int,
                           settings: GeometricSettings = GeometricSettings()) -> DetectionSample:  # fmt: skip
    """The training decoding: a random affine crop of size x size and the DB targets of the moved words."""
    rng = np.random.default_rng(sample_seed(stream_seed, pass_index, ref.sample_id))
    image, words, _ = augment(rng, _rgb(ref), text_regions(read_annotation(ref)), (size, size), settings)
    return DetectionSample(torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).contiguous(),
                           torch.from_numpy(_targets(words, size)), 1.0)  # fmt: skip


def min_text_size(size: int) -> float:
    """MMOCR's 8 px smallest trainable word at 640 px crops, scaled to the decoding size (2.4 px at 192)."""
    return MIN_TEXT_SIZE * size / 640


def _targets(words: TextRegions, size: int) -> np.ndarray:
    return db_targets(words, size, size, min_text_size=min_text_size(size)).stacked()


def label_row(targets: torch.Tensor) -> torch.Tensor:
    """DB targets [4, S, S] -> the evaluation label row on the stored grid (`tasks.detection.task`), flattened
    uint8: text where most of a cell is shrunk kernel, don't-care where most of it is masked out."""
    side = map_side(targets.shape[-1])
    pooled = torch.nn.functional.adaptive_avg_pool2d(targets[None, :2], side)[0]
    row = torch.full((side, side), BACKGROUND, dtype=torch.uint8)
    row[pooled[0] >= 0.5] = TEXT
    row[pooled[1] < 0.5] = DONT_CARE
    return row.flatten()


def _mask(ref: SampleRef) -> np.ndarray:
    with Image.open(io.BytesIO(read_annotation(ref))) as mask:
        return np.asarray(mask)


def eval_mask_sample(ref: SampleRef, size: int) -> tuple[torch.Tensor, np.ndarray]:
    """The evaluation decoding of a segmentation sample: image and mask on the size x size canvas."""
    canvas, _ = fit_canvas(_rgb(ref), size)
    return torch.from_numpy(canvas).permute(2, 0, 1).contiguous(), fit_mask(_mask(ref), size)


def train_mask_sample(
    ref: SampleRef, size: int, stream_seed: int, pass_index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The training decoding of a segmentation sample: one random affine of image and mask (nearest, 0 outside)."""
    rng = np.random.default_rng(sample_seed(stream_seed, pass_index, ref.sample_id))
    image, _, mask = augment(rng, _rgb(ref), TextRegions(), (size, size), GeometricSettings(), mask=_mask(ref))
    return (torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).contiguous(),
            torch.from_numpy(np.ascontiguousarray(mask)).long())  # fmt: skip


def dense_train_decoder(annotation: str, size: int, stream_seed: int, augmented: bool) -> DenseDecoder:
    """The training decoder of samples carrying `annotation` ("json": text regions, "mask.png": class-id masks):
    the image and its target (DB maps, or the mask), a seeded random affine crop when `augmented` (else the
    evaluation canvas)."""
    _check_annotation(annotation)
    if annotation == MASK_EXT:
        if not augmented:
            return lambda ref, _pass: _long_mask(eval_mask_sample(ref, size))
        return lambda ref, pass_index: train_mask_sample(ref, size, stream_seed, pass_index)
    if not augmented:
        return lambda ref, _pass: _as_pair(eval_detection_sample(ref, size), labels=False)
    return lambda ref, pass_index: _as_pair(train_detection_sample(ref, size, stream_seed, pass_index), labels=False)


def dense_eval_decoder(annotation: str, size: int, num_classes: int) -> DenseDecoder:
    """The evaluation decoder: the image on the canvas and its label row."""
    _check_annotation(annotation)
    if annotation == MASK_EXT:
        side = grid_side(size, num_classes)

        def decode(ref: SampleRef, _pass: int) -> tuple[torch.Tensor, torch.Tensor]:
            image, mask = eval_mask_sample(ref, size)
            return image, torch.from_numpy(np.ascontiguousarray(label_grid(mask, side))).flatten()

        return decode
    return lambda ref, _pass: _as_pair(eval_detection_sample(ref, size), labels=True)


def _long_mask(sample: tuple[torch.Tensor, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    return sample[0], torch.from_numpy(sample[1]).long()


def _as_pair(sample: DetectionSample, labels: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return sample.image, label_row(sample.targets) if labels else sample.targets


def _check_annotation(annotation: str) -> None:
    if annotation not in ("json", MASK_EXT):
        raise DataError(f"no decoder for samples annotated with {annotation!r} (text regions 'json', masks "
                        f"{MASK_EXT!r})")  # fmt: skip
