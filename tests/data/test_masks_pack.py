"""Segmentation data: generated shapes with class-id masks, packed with `--masks`; refusals name the image."""

import io
import json

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from distrain.data.synth_shapes import SHAPE_CLASSES, draw_shapes

from conftest import distrain_cli, last_line


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    from distrain.data.synth_shapes import write_synth_shapes

    return write_synth_shapes(root / "s", 16)


def test_a_shapes_mask_marks_its_shapes_pixels():
    image, mask = draw_shapes(np.random.default_rng(3))
    ids = np.asarray(mask)
    assert set(np.unique(ids)) <= set(range(len(SHAPE_CLASSES))) and (ids > 0).any() and (ids == 0).any()
    pixels = np.asarray(image).astype(float)
    for c in np.unique(ids[ids > 0]):  # a shape's class is one colour (the last shape drawn there)
        assert pixels[ids == c].std(axis=0).max() < pixels[ids == 0].std(axis=0).max() + 40


def test_pack_masks_round_trip_and_strata(shapes, tmp_path, capsys):
    proc = distrain_cli(capsys, "data", "pack", "--images", str(shapes / "images"), "--masks", str(shapes / "masks"),
                        "--out", str(tmp_path / "packed"), "--test-fraction", "0.25")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    index = json.loads((tmp_path / "packed" / "index.json").read_text())
    assert index["annotations"] == "mask.png" and index["classes"] == ["0", "1", "2", "3"]
    seen = 0
    for shard in index["shards"]["cv"] + index["shards"]["test"]:
        for sample in wds.WebDataset(str(tmp_path / "packed" / shard), shardshuffle=False):
            assert sample["mask.png"] == (shapes / "masks" / f"{sample['__key__']}.png").read_bytes()
            ids = np.asarray(Image.open(io.BytesIO(sample["mask.png"])))
            stratum = next(s["stratum"] for s in index["samples"] if s["sample_id"] == sample["__key__"])
            assert stratum == np.bincount(ids[ids > 0], minlength=4).argmax()
            seen += 1
    assert seen == 16


@pytest.mark.parametrize("damage, message", [
    (lambda m: (m / "shapes-00002.png").unlink(), "shapes-00002.png: no mask"),
    (lambda m: Image.new("L", (10, 10)).save(m / "shapes-00003.png"), "shapes-00003.png is 10x10, the image 96x96"),
    (lambda m: Image.new("RGB", (96, 96)).save(m / "shapes-00004.png"), "8-bit PNG of class ids, got mode RGB"),
])  # fmt: skip
def test_bad_masks_are_refused_in_one_line(shapes, tmp_path, capsys, damage, message):
    import shutil

    masks = tmp_path / "masks"
    shutil.copytree(shapes / "masks", masks)
    damage(masks)
    proc = distrain_cli(capsys, "data", "pack", "--images", str(shapes / "images"), "--masks", str(masks),
                        "--out", str(tmp_path / "out"))  # fmt: skip
    assert proc.returncode == 2 and message in last_line(proc.stderr), proc.stderr
    assert not (tmp_path / "out").exists()


def test_synth_shapes_cli(tmp_path, capsys):
    proc = distrain_cli(capsys, "data", "synth-shapes", "--out", str(tmp_path / "s"), "--images", "3")
    assert proc.returncode == 0 and len(list((tmp_path / "s" / "masks").glob("*.png"))) == 3


def test_groups_keep_a_groups_images_on_one_side_of_the_holdout_and_bad_rows_are_refused(shapes, tmp_path, capsys):
    names = sorted(p.name for p in (shapes / "images").glob("*.png"))
    rows = ["image,group"] + [f"{name},scene{i // 4}" for i, name in enumerate(names)]  # 4 scenes of 4 images
    (tmp_path / "groups.csv").write_text("\n".join(rows) + "\n")
    proc = distrain_cli(capsys, "data", "pack", "--images", str(shapes / "images"), "--masks", str(shapes / "masks"),
                        "--groups", str(tmp_path / "groups.csv"), "--out", str(tmp_path / "packed"),
                        "--test-fraction", "0.25")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    samples = json.loads((tmp_path / "packed" / "index.json").read_text())["samples"]
    split_of_group = {}
    for s in samples:
        split_of_group.setdefault(s["group"], set()).add(s["split"])
    assert sorted(split_of_group) == [f"scene{g}" for g in range(4)]
    assert all(len(splits) == 1 for splits in split_of_group.values()) and {"test"} in split_of_group.values()
    (tmp_path / "short.csv").write_text("\n".join(rows[:-1]) + "\n")  # the last image has no row
    bad = distrain_cli(capsys, "data", "pack", "--images", str(shapes / "images"), "--masks", str(shapes / "masks"),
                       "--groups", str(tmp_path / "short.csv"), "--out", str(tmp_path / "out2"))  # fmt: skip
    assert bad.returncode == 2 and f"{names[-1]}: no row in" in last_line(bad.stderr)
    assert not (tmp_path / "out2").exists()
    (tmp_path / "twice.csv").write_text(f"{names[0]},a\n{names[0]},b\n")
    bad = distrain_cli(capsys, "data", "pack", "--images", str(shapes / "images"), "--masks", str(shapes / "masks"),
                       "--groups", str(tmp_path / "twice.csv"), "--out", str(tmp_path / "out3"))  # fmt: skip
    assert bad.returncode == 2 and "twice.csv:2: image" in last_line(bad.stderr) and "named twice" in bad.stderr
