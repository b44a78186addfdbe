"""`distrain data pack --detection ANN.json --images DIR`: shards whose samples carry their words, a holdout
stratified by word count, and one-line refusals of bad annotations naming the image."""

import json

import pytest
import webdataset as wds

from distrain.data.synth_text import write_synth_text

from conftest import distrain_cli, last_line


@pytest.fixture(scope="module")
def receipts(tmp_path_factory):
    root = tmp_path_factory.mktemp("receipts")
    write_synth_text(root, 20)
    return root


def test_packed_shards_carry_each_images_words(receipts, tmp_path, capsys):
    proc = distrain_cli(capsys, "data", "pack", "--detection", str(receipts / "annotations.json"), "--images",
                        str(receipts / "images"), "--out", str(tmp_path / "packed"),
                        "--test-fraction", "0.25")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "wrote 15 CV + 5 test samples, 1 classes, 3 channel(s)" in proc.stdout
    index = json.loads((tmp_path / "packed" / "index.json").read_text())
    assert index["annotations"] == "json" and index["classes"] == ["text"]
    assert {s["split"] for s in index["samples"]} == {"cv", "test"} and all("stratum" in s for s in index["samples"])
    truth = {
        e["file"].removesuffix(".jpg"): e["words"]
        for e in json.loads((receipts / "annotations.json").read_text())["images"]
    }
    seen = 0
    for shard in index["shards"]["cv"] + index["shards"]["test"]:
        for sample in wds.WebDataset(str(tmp_path / "packed" / shard), shardshuffle=False):
            words = json.loads(sample["json"])["words"]
            expected = truth[sample["__key__"]]
            assert [w["points"] for w in words] == [w["points"] for w in expected]
            assert [w["ignore"] for w in words] == [w["ignore"] for w in expected]
            assert sample["jpg"] == (receipts / "images" / f"{sample['__key__']}.jpg").read_bytes()
            seen += 1
    assert seen == 20


def bad_copy(receipts, tmp_path, change):
    data = json.loads((receipts / "annotations.json").read_text())
    change(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda d: d["images"][3]["words"][0].update(points=[[1, 1], [5, 5]]),
            ["receipt-00003.jpg: word 0 (", "a polygon needs at least 3 (x, y) points, got 2"],
        ),
        (
            lambda d: d["images"][4]["words"][1].update(points=[[1, 1], [900, 1], [900, 9]]),
            ["receipt-00004.jpg: word 1 (", "a polygon lies outside the"],
        ),
        (lambda d: d["images"].pop(5), "receipt-00005.jpg: no entry in"),
        (lambda d: d["images"].append({"file": "missing.jpg", "words": []}), "image 'missing.jpg' not found in"),
        (lambda d: d.update(images="nope"), 'expected {"images": [{"file"'),
    ],
)
def test_bad_annotations_are_one_line_naming_the_image_and_write_nothing(receipts, tmp_path, capsys, change, message):
    ann = bad_copy(receipts, tmp_path, change)
    proc = distrain_cli(capsys, "data", "pack", "--detection", str(ann), "--images", str(receipts / "images"),
                        "--out", str(tmp_path / "out"))  # fmt: skip
    fragments = message if isinstance(message, list) else [message]
    assert proc.returncode == 2 and all(f in last_line(proc.stderr) for f in fragments), proc.stderr
    assert last_line(proc.stderr).startswith("distrain: error: ") and not (tmp_path / "out").exists()


def test_detection_goes_with_an_image_folder_only(receipts, tmp_path, capsys):
    proc = distrain_cli(capsys, "data", "pack", "--detection", str(receipts / "annotations.json"), "--csv", "x.csv",
                        "--out", str(tmp_path / "out"))  # fmt: skip
    assert proc.returncode == 2 and "--detection ANN.json goes with --images DIR" in last_line(proc.stderr)


def test_a_group_keeps_its_receipts_on_one_side_of_the_holdout(receipts, tmp_path, capsys):
    data = json.loads((receipts / "annotations.json").read_text())
    for i, entry in enumerate(data["images"]):
        entry["group"] = f"store-{i // 4}"  # 5 stores of 4 receipts
    ann = tmp_path / "grouped.json"
    ann.write_text(json.dumps(data))
    proc = distrain_cli(capsys, "data", "pack", "--detection", str(ann), "--images", str(receipts / "images"),
                        "--out", str(tmp_path / "packed"), "--test-fraction", "0.2")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    index = json.loads((tmp_path / "packed" / "index.json").read_text())
    split_of_group = {}
    for s in index["samples"]:
        split_of_group.setdefault(s["group"], set()).add(s["split"])
    assert len(split_of_group) == 5 and all(len(v) == 1 for v in split_of_group.values()), split_of_group
    assert {"cv", "test"} == set().union(*split_of_group.values())
