"""The synthetic receipt generator: exact word polygons (the ink lies inside them), don't-care words, one
receipt per (seed, i), the CLI's refusals."""

import json

import numpy as np
import pytest
from PIL import Image

from distrain.data.synth_text import ANNOTATIONS, draw_receipt, rotate_points, write_synth_text
from distrain.tasks.detection.geometry import polygon_problem

from conftest import distrain_cli, last_line


def ink_and_boxes(image: Image.Image, words: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Dark pixels (ink) and the pixels inside the words' polygons, grown by one pixel for antialiasing."""
    import cv2

    gray = np.asarray(image.convert("L"), dtype=np.float32)
    ink = gray < np.median(gray) - 60
    inside = np.zeros(gray.shape, np.uint8)
    cv2.fillPoly(inside, [np.round(w["points"]).astype(np.int32) for w in words], 1)
    return ink, cv2.dilate(inside, np.ones((3, 3), np.uint8)).astype(bool)


@pytest.mark.parametrize("i", range(6))
def test_the_ink_of_every_word_lies_inside_its_polygon(i):
    image, words = draw_receipt(np.random.default_rng([0, i]))
    ink, inside = ink_and_boxes(image, words)
    assert len(words) >= 6
    assert ink[inside].sum() / ink.sum() > 0.97  # nearly all ink is annotated (smudges are grey, not ink)
    for w in words:
        assert polygon_problem(np.array(w["points"]), image.width, image.height) is None
        mask = np.zeros_like(inside, np.uint8)
        import cv2

        cv2.fillPoly(mask, [np.round(w["points"]).astype(np.int32)], 1)
        assert w["ignore"] or ink[mask.astype(bool)].mean() > 0.08, w  # every readable word's box holds ink


def test_rotation_of_points_matches_pillows_rotation_of_pixels():
    image = Image.new("L", (60, 40), 0)
    image.paste(255, (49, 19, 52, 22))  # a 3 x 3 block centred on (50, 20)
    turned = np.asarray(image.rotate(30, resample=Image.BILINEAR, center=(30, 20)), dtype=np.float64)
    ys, xs = np.mgrid[: turned.shape[0], : turned.shape[1]]
    centroid = [(xs * turned).sum() / turned.sum(), (ys * turned).sum() / turned.sum()]
    np.testing.assert_allclose(rotate_points(np.array([[50.0, 20.0]]), 30, (30, 20))[0], centroid, atol=0.6)


def test_receipts_depend_only_on_seed_and_index_and_the_file_is_icdar_style(tmp_path):
    a = json.loads(write_synth_text(tmp_path / "a", 3, seed=1).read_text())
    b = json.loads(write_synth_text(tmp_path / "b", 2, seed=1).read_text())
    assert a["images"][:2] == b["images"] and (tmp_path / "a" / "images" / "receipt-00002.jpg").is_file()
    entry = a["images"][0]
    assert set(entry) == {"file", "width", "height", "words"} and set(entry["words"][0]) == {"points", "text", "ignore"}
    many = [w["ignore"] for e in json.loads(write_synth_text(tmp_path / "c", 12).read_text())["images"]
            for w in e["words"]]  # fmt: skip
    assert 0 < sum(many) < 0.2 * len(many)  # some don't-care words, few


def test_cli_writes_receipts_and_refuses_a_bad_count_or_a_used_folder(tmp_path, capsys):
    ok = distrain_cli(capsys, "data", "synth-text", "--out", str(tmp_path / "r"), "--images", "2")
    assert ok.returncode == 0 and "wrote 2 synthetic receipts" in ok.stdout
    assert len(json.loads((tmp_path / "r" / ANNOTATIONS).read_text())["images"]) == 2
    bad = distrain_cli(capsys, "data", "synth-text", "--out", str(tmp_path / "s"), "--images", "two")
    assert bad.returncode == 2 and "--images N needs a positive number of images, got 'two'" in last_line(bad.stderr)
    used = distrain_cli(capsys, "data", "synth-text", "--out", str(tmp_path / "r"), "--images", "2")
    assert used.returncode == 2 and "exists and is not empty" in last_line(used.stderr)


def test_the_synth_text_source_is_packed_once_for_text_detection(tmp_path):
    from distrain.data.index import read_index
    from distrain.data.synth_text import ensure_synth_text

    ensure_synth_text(tmp_path / "data", images=10)
    index = read_index(tmp_path / "data", 1, "text_detection")
    assert len(index.sample_ids) == 10 and len(index.split_ids("test")) == 2 and index.annotations == "json"
    stamp = (tmp_path / "data" / "index.json").stat().st_mtime_ns
    ensure_synth_text(tmp_path / "data", images=10)  # a complete copy is kept
    assert (tmp_path / "data" / "index.json").stat().st_mtime_ns == stamp
