"""Dense samples from packed shards: the annotation travels with its image, evaluation decodes onto a fixed canvas
whose targets give the words back, training crops are seeded per (stream, pass, sample)."""

import json

import numpy as np
import pytest
import torch

from distrain.data.dense import eval_detection_sample, text_regions, train_detection_sample
from distrain.data.detection import samples_from_detection
from distrain.data.pack import write_dataset
from distrain.data.shards import read_annotation, shard_samples
from distrain.data.synth_text import write_synth_text
from distrain.tasks.detection.augment import scaled
from distrain.tasks.detection.hmean import count_matches
from distrain.tasks.detection.postprocess import PostprocessSettings, boxes_from_map


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    root = tmp_path_factory.mktemp("dense")
    write_synth_text(root / "raw", 6)
    samples, classes = samples_from_detection(root / "raw" / "annotations.json", root / "raw" / "images")
    index = write_dataset(samples, root / "shards", classes=classes, test_fraction=0.0)
    refs = [ref for url in index.urls("cv") for ref in shard_samples(url)]
    return root, refs


def test_every_ref_carries_its_words(packed):
    root, refs = packed
    truth = {e["file"].removesuffix(".jpg"): e["words"] for e in
             json.loads((root / "raw" / "annotations.json").read_text())["images"]}  # fmt: skip
    assert len(refs) == 6
    for ref in refs:
        assert json.loads(read_annotation(ref))["words"] == [
            {"points": w["points"], "text": w["text"], "ignore": w["ignore"]} for w in truth[ref.sample_id]
        ]


def test_evaluation_canvas_and_its_targets_give_the_words_back(packed):
    _, refs = packed
    for ref in refs:
        sample = eval_detection_sample(ref, 512)  # receipts of 300-440 px: words stay above DB's 8 px minimum
        assert sample.image.shape == (3, 512, 512) and sample.image.dtype == torch.uint8
        assert sample.targets.shape == (4, 512, 512)
        found = boxes_from_map(sample.targets[0].numpy(), PostprocessSettings(min_size=1.0))
        words = text_regions(read_annotation(ref))
        counts = count_matches(words, scaled(found, 1 / sample.scale))
        assert counts.recall >= 0.9 and counts.precision >= 0.9, (ref.sample_id, counts)


def test_training_crops_repeat_per_seed_and_pass_and_differ_across_passes(packed):
    _, refs = packed
    a = train_detection_sample(refs[0], 128, stream_seed=3, pass_index=0)
    b = train_detection_sample(refs[0], 128, stream_seed=3, pass_index=0)
    c = train_detection_sample(refs[0], 128, stream_seed=3, pass_index=1)
    assert torch.equal(a.image, b.image) and torch.equal(a.targets, b.targets)
    assert not torch.equal(a.image, c.image)
    assert a.image.shape == (3, 128, 128) and a.targets.shape == (4, 128, 128)
    text = a.targets[0].numpy() > 0
    if text.any():  # the kernels lie on ink: darker than the page around them
        gray = a.image.float().mean(0).numpy()
        assert gray[text].mean() < np.median(gray)


def test_a_size_not_a_multiple_of_32_is_refused(packed):
    from distrain.errors import DataError

    with pytest.raises(DataError, match="multiples of 32, got 100"):
        eval_detection_sample(packed[1][0], 100)
