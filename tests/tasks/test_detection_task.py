"""The text_detection task behind the `Task` interface: its per-epoch score, its stored maps and label rows, and
the config and data it refuses."""

import numpy as np
import pytest
import torch

from distrain.config import config_from_dict
from distrain.data.dense import label_row, min_text_size
from distrain.data.detection import samples_from_detection
from distrain.data.index import read_index
from distrain.data.pack import write_dataset
from distrain.data.synth_text import write_synth_text
from distrain.errors import ConfigError, DataError
from distrain.tasks import get_task
from distrain.tasks.detection.geometry import TextRegions
from distrain.tasks.detection.targets import db_targets
from distrain.tasks.detection.task import DONT_CARE, MAX_MAP_SIDE, TEXT, map_side, pixel_f1

TASK = get_task("text_detection")
BASE = {"task": "text_detection", "data": {"source": "shards", "root": "x", "image_size": 64, "num_classes": 1},
        "train": {"metric": "pixel_f1", "loss": "db"}, "model": {"names": ["test_resnet"]}}  # fmt: skip


def test_pixel_f1_by_hand_leaves_dont_care_pixels_out():
    labels = np.array([[TEXT, TEXT, 0, 0, DONT_CARE, DONT_CARE]])
    probs = np.array([[0.9, 0.2, 0.7, 0.1, 0.9, 0.9]])  # tp 1, fn 1, fp 1; the don't-care hits count for nothing
    assert pixel_f1(labels, probs) == pytest.approx(2 * 1 / (2 + 2))
    assert TASK.score("pixel_f1", labels, probs) == pytest.approx(0.5)
    assert pixel_f1(np.zeros((1, 4), np.uint8), np.zeros((1, 4))) == 1.0  # nothing to find, nothing found
    with pytest.raises(ValueError, match="pixel_f1"):
        TASK.score("accuracy", labels, probs)


def test_stored_maps_are_bounded_and_label_rows_mark_text_and_dont_care():
    out = torch.rand(2, 3, 320, 320)
    assert TASK.activate(out).shape == (2, MAX_MAP_SIDE**2)  # 320 px is kept at stride 2
    assert TASK.activate(out[..., :64, :64]).shape == (2, 64 * 64) and map_side(960) == MAX_MAP_SIDE
    words = TextRegions([[[8, 8], [56, 8], [56, 24], [8, 24]], [[8, 40], [56, 40], [56, 56], [8, 56]]],
                        ignore=np.array([False, True]))  # fmt: skip
    row = label_row(torch.from_numpy(db_targets(words, 64, 64, min_text_size=min_text_size(64)).stacked()))
    grid = row.reshape(64, 64).numpy()
    assert grid[16, 32] == TEXT and grid[48, 32] == DONT_CARE and grid[32, 32] == 0 and grid[2, 2] == 0
    assert TASK.validation_loss(np.where(row.numpy() == TEXT, 0.99, 0.01)[None], row.numpy()[None]) < 0.02


@pytest.mark.parametrize(
    "change, message",
    [
        ({"augment": {"mixup": 0.2}}, "augment.mixup"),
        ({"augment": {"re_prob": 0.25}}, "augment.re_prob"),
        ({"tta": {"hflip": True}}, "tta"),
        ({"data": {"image_size": 80}}, "a multiple of 32"),
        ({"data": {"num_classes": 2}}, "expected 1 for task: text_detection"),
        ({"train": {"metric": "accuracy"}}, "a text_detection metric"),
        ({"train": {"loss": "ce"}}, "a text_detection loss"),
        ({"train": {"label_smoothing": 0.1}}, "train.label_smoothing"),
    ],
)
def test_settings_that_do_not_fit_a_dense_task_are_refused(change, message):
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in BASE.items()}
    for section, values in change.items():
        raw[section] = {**raw.get(section, {}), **values}
    with pytest.raises(ConfigError, match=message):
        config_from_dict(raw, check_models=False)
    assert config_from_dict(BASE, check_models=False).task == "text_detection"


def test_an_index_is_refused_by_a_task_whose_samples_it_does_not_hold(tmp_path):
    write_synth_text(tmp_path / "raw", 4)
    samples, classes = samples_from_detection(tmp_path / "raw" / "annotations.json", tmp_path / "raw" / "images")
    write_dataset(samples, tmp_path / "shards", classes=classes, test_fraction=0.0)
    assert read_index(tmp_path / "shards", 1, "text_detection").annotations == "json"
    with pytest.raises(
        DataError, match="task multiclass takes samples with no annotations; index.json says annotations"
    ):
        read_index(tmp_path / "shards", None, "multiclass")


@pytest.mark.parametrize("task_name", ["text_detection", "segmentation"])
def test_your_own_factory_builds_a_dense_network_when_asked_for_features(task_name):
    import functools

    from distrain.tasks import HeadSettings
    from distrain.training.models import create_model

    task = get_task(task_name)
    make = functools.partial(create_model, "factories:pyramid")
    classes = 1 if task_name == "text_detection" else 4
    model = task.build_model(make, classes, 3, HeadSettings(neck_channels=16))
    out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 3 if task_name == "text_detection" else classes, 64, 64)  # DBNet: P, T, B maps
    assert task.activate(out).shape == (2, 64 * 64 if task_name == "text_detection" else classes * 64 * 64)
