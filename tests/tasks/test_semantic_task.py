"""The segmentation task behind the `Task` interface: its stored maps and label rows, its score, and the masks'
way from the shards to the label rows (one function for training and the aggregation)."""

import numpy as np
import pytest
import torch

from distrain.config import config_from_dict
from distrain.data.dense import dense_eval_decoder, dense_train_decoder
from distrain.data.masks import samples_from_masks
from distrain.data.pack import write_dataset
from distrain.data.shards import shard_samples
from distrain.data.synth_shapes import SHAPE_CLASSES, write_synth_shapes
from distrain.errors import ConfigError
from distrain.tasks import get_task
from distrain.tasks.semantic import IGNORE, MAX_VALUES, fit_mask, grid_side, label_grid, mask_scores

TASK = get_task("segmentation")


def test_scores_by_hand_leave_unlabelled_pixels_out():
    labels = np.array([[0, 0, 1, 1, IGNORE]], np.uint8)  # 5 pixels, 2 classes: maps class by class
    probs = np.array([[0.9, 0.2, 0.1, 0.8, 0.0, 0.1, 0.8, 0.9, 0.2, 1.0]], np.float32)
    # decided: 0, 1, 1, 0, (1: unlabelled) -> class 0: tp 1 fp 1 fn 1 (IoU 1/3), class 1: tp 1 fp 1 fn 1 (1/3)
    assert TASK.score("miou", labels, probs) == pytest.approx(1 / 3)
    assert TASK.score("fscore", labels, probs) == pytest.approx(0.5)
    assert mask_scores(labels, probs)["pixel_accuracy"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="miou"):
        TASK.score("accuracy", labels, probs)


def test_stored_maps_stay_bounded_and_label_rows_sample_the_mask_as_torch_nearest_does():
    assert grid_side(96, 4) == 80 and grid_side(640, 4) * grid_side(640, 4) * 4 <= MAX_VALUES
    logits = torch.randn(2, 4, 96, 96)
    assert TASK.activate(logits).shape == (2, 4 * 80 * 80)
    assert torch.allclose(TASK.activate(logits).reshape(2, 4, -1).sum(1), torch.ones(2, 80 * 80), atol=1e-5)
    mask = np.random.default_rng(0).integers(0, 4, (96, 96)).astype(np.uint8)
    nearest = torch.nn.functional.interpolate(torch.from_numpy(mask)[None, None].float(), size=80, mode="nearest")
    assert np.array_equal(label_grid(mask, 80), nearest[0, 0].numpy().astype(np.uint8))
    wide = fit_mask(np.ones((40, 80), np.uint8), 96)  # fitted as its image: the rest of the canvas unlabelled
    assert (wide[:48] == 1).all() and (wide[48:] == IGNORE).all()


def test_decoders_move_image_and_mask_together_and_give_label_rows(tmp_path):
    write_synth_shapes(tmp_path / "raw", 4)
    samples, classes = samples_from_masks(tmp_path / "raw" / "images", tmp_path / "raw" / "masks", SHAPE_CLASSES)
    index = write_dataset(samples, tmp_path / "shards", classes=classes, test_fraction=0.0)
    ref = next(r for url in index.urls("cv") for r in shard_samples(url))
    image, row = dense_eval_decoder("mask.png", 64, 4)(ref, 0)
    assert image.shape == (3, 64, 64) and row.shape == (grid_side(64, 4) ** 2,) and row.dtype == torch.uint8
    crop, target = dense_train_decoder("mask.png", 64, 7, True)(ref, 0)
    again = dense_train_decoder("mask.png", 64, 7, True)(ref, 0)
    assert torch.equal(crop, again[0]) and torch.equal(target, again[1]) and target.dtype == torch.long
    background = (crop.float().std(dim=0) < 1) & (crop.float().mean(dim=0) == 0)  # the black border of the warp
    assert (target[background] == 0).all()  # the mask is 0 outside the moved image too


def test_a_generated_source_must_fit_the_task():
    raw = {"task": "multiclass", "data": {"source": "synth_shapes", "root": "x", "num_classes": 4}}
    with pytest.raises(ConfigError, match="data.source"):
        config_from_dict(raw, check_models=False)
