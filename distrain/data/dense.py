"""Decoding dense samples (text detection): a shard's image and its words, as the network's input and DB targets.

Training: one random affine (`tasks.detection.augment`) to a size x size crop, then the DB targets of the moved
polygons; seeded per (stream, pass, sample) as classification's augmentation, so a resumed job draws the same
crops. Evaluation: the whole image fitted into a size x size canvas (`fit_canvas`), so every prediction map has
one shape and the OOF store can keep fixed-size rows; the scale maps predicted boxes back to the image's
pixels."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from distrain.data.augment import sample_seed
from distrain.data.shards import SampleRef, read_annotation, read_image
from distrain.errors import DataError
from distrain.tasks.detection.augment import GeometricSettings, augment, fit_canvas, scaled
from distrain.tasks.detection.geometry import TextRegions
from distrain.tasks.detection.targets import db_targets


def text_regions(annotation: bytes) -> TextRegions:
    """The words of a packed detection sample (`{"words": [{"points", "text", "ignore"}]}`)."""
    words = json.loads(annotation)["words"]
    return TextRegions([w["points"] for w in words], ignore=np.array([bool(w["ignore"]) for w in words], bool))


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
                           torch.from_numpy(db_targets(scaled(words, scale), size, size).stacked()), scale)  # fmt: skip


def train_detection_sample(ref: SampleRef, size: int, stream_seed: int, pass_index: int,
                           settings: GeometricSettings = GeometricSettings()) -> DetectionSample:  # fmt: skip
    """The training decoding: a random affine crop of size x size and the DB targets of the moved words."""
    rng = np.random.default_rng(sample_seed(stream_seed, pass_index, ref.sample_id))
    image, words, _ = augment(rng, _rgb(ref), text_regions(read_annotation(ref)), (size, size), settings)
    return DetectionSample(torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).contiguous(),
                           torch.from_numpy(db_targets(words, size, size).stacked()), 1.0)  # fmt: skip
