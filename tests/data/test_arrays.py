"""`distrain data pack --npz`: arrays in, the same shards and index as folders give, pixels back out unchanged; a bad
array is one line, exit 2, nothing written."""

import io

import numpy as np
import pytest
from PIL import Image

from distrain.data.index import read_index
from distrain.data.shards import read_image, shard_samples

from conftest import distrain_cli


def pixels_by_id(index) -> dict[str, np.ndarray]:
    out = {}
    for url in index.urls("cv") + index.urls("test"):
        for ref in shard_samples(url):
            out[ref.sample_id] = np.asarray(Image.open(io.BytesIO(read_image(ref))))
    return out


def test_arrays_round_trip_with_their_labels_groups_and_holdout(tmp_path, capsys):
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (40, 12, 10), dtype=np.uint8)
    y, g = np.arange(40) % 4, np.arange(40) // 2
    np.savez(tmp_path / "train.npz", x=gray, y=y, g=g)
    colour = rng.random((12, 9, 7, 3))  # floats in [0, 1]
    np.savez(tmp_path / "test.npz", x=colour, y=np.arange(12) % 4, g=np.arange(12))
    files = ["--npz", str(tmp_path / "train.npz"), "--test", str(tmp_path / "test.npz")]
    proc = distrain_cli(capsys, "data", "pack", *files, "--group", "g", "--out", str(tmp_path / "packed"))
    assert proc.returncode == 0, proc.stderr
    index = read_index(tmp_path / "packed", 4)
    assert index.classes == ["0", "1", "2", "3"] and index.channels == 3  # a colour image among them
    assert sorted(index.split_ids("test")) == [f"test-{i:06d}" for i in range(12)]
    assert sorted(index.split_ids("cv")) == [f"train-{i:06d}" for i in range(40)]
    labels, groups = index.labels_of("cv"), dict(zip(index.sample_ids, index.groups))
    assert all(labels[f"train-{i:06d}"] == y[i] and groups[f"train-{i:06d}"] == str(g[i]) for i in range(40))
    decoded = pixels_by_id(index)
    for i in range(40):
        np.testing.assert_array_equal(decoded[f"train-{i:06d}"], gray[i])
    for i in range(12):
        np.testing.assert_array_equal(decoded[f"test-{i:06d}"], np.rint(colour[i] * 255).astype(np.uint8))


def test_without_a_test_file_the_holdout_is_a_stratified_fraction(tmp_path, capsys):
    x = np.random.default_rng(1).integers(0, 256, (50, 8, 8, 1), dtype=np.uint8)
    np.savez(tmp_path / "a.npz", images=x, label=np.arange(50) % 2)
    proc = distrain_cli(capsys, "data", "pack", "--npz", str(tmp_path / "a.npz"), "--images", "images", "--label",
                        "label", "--test-fraction", "0.2", "--out", str(tmp_path / "packed"))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    index = read_index(tmp_path / "packed")
    assert len(index.split_ids("test")) == 10 and index.channels == 1
    test_labels = list(index.labels_of("test").values())
    assert test_labels.count(0) == test_labels.count(1) == 5


BAD = [
    (dict(x=np.zeros((4, 8, 8), np.uint8)), "no array 'y' (it holds x)"),
    (dict(x=np.zeros((4, 8, 8), np.uint8), y=np.arange(3)), "'y' has 3 rows, images 'x' 4"),
    (
        dict(x=np.zeros((4, 8), np.uint8), y=np.arange(4)),
        "must be N x H x W or N x H x W x C (C 1 or 3), got shape (4, 8)",
    ),
    (dict(x=np.zeros((4, 8, 8, 2), np.uint8), y=np.arange(4)), "got shape (4, 8, 8, 2)"),
    (dict(x=np.full((4, 8, 8), 2.0), y=np.arange(4)), "must be uint8, integers in [0, 255] or floats in [0, 1]"),
    (dict(x=np.zeros((4, 8, 8), np.uint8), y=np.array([0.5, 1, 2, 3])), "must be N non-negative integers"),
    (dict(x=np.zeros((4, 8, 8), np.uint8), y=np.array([0, 1, -1, 3])), "must be N non-negative integers"),
]


@pytest.mark.parametrize("arrays, message", BAD, ids=[m for _, m in BAD])
def test_bad_arrays_are_one_line_exit_2_and_nothing_written(tmp_path, capsys, arrays, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    proc = distrain_cli(capsys, "data", "pack", "--npz", str(tmp_path / "bad.npz"), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == [tmp_path / "bad.npz"]


def test_a_missing_or_unreadable_file_and_a_stray_test_flag_are_one_line(tmp_path, capsys):
    (tmp_path / "junk.npz").write_text("not a zip")
    for argv, message in [
        (["--npz", str(tmp_path / "none.npz")], "npz file not found"),
        (["--npz", str(tmp_path / "junk.npz")], "not an npz file numpy can read"),
        (["--csv", "x.csv", "--test", "t.npz"], "--test FILE goes with --npz"),
        (["--npz", "a.npz", "--csv", "b.csv"], "exactly one of --images DIR, --csv FILE or --npz FILE"),
    ]:
        proc = distrain_cli(capsys, "data", "pack", *argv, "--out", str(tmp_path / "out"))
        assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, argv
    assert not (tmp_path / "out").exists()
