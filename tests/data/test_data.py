import csv
import io

import numpy as np
import pytest
import torch
from PIL import Image

from distrain import errors
from distrain.data import index as index_mod
from distrain.data import loaders, pack, transforms
from distrain.data.shards import read_image, shard_samples
from distrain.tasks.classification import DIGIT_PROPERTIES


def _shard_rows(url, transform):
    """(sample id, eval-decoded image, the label stored in the shard's .cls member) per sample of a shard."""
    import tarfile

    with tarfile.open(url) as tar:
        stored = {m.name.split(".")[0]: int(tar.extractfile(m).read()) for m in tar if m.name.endswith(".cls")}
    return [(ref.sample_id, transform.decode(Image.open(io.BytesIO(read_image(ref)))), stored[ref.sample_id])
            for ref in shard_samples(url)]  # fmt: skip


def test_digits_round_trip_with_ids_labels_and_holdout(tmp_path):
    index = pack.write_digits(tmp_path / "digits", shard_size=100)
    assert len(index.sample_ids) == 1797 and len(set(index.sample_ids)) == 1797
    test_ids = set(index.split_ids("test"))
    assert len(test_ids) == 360  # 20% stratified holdout
    assert np.bincount([index.labels[index.sample_ids.index(s)] for s in test_ids]).min() >= 35
    seen = {}
    for split in ("cv", "test"):
        for url in index.urls(split):
            for sid, image, label in _shard_rows(url, transforms.ImageTransform(16, 1)):
                assert image.shape == (1, 16, 16) and image.dtype == torch.uint8
                seen[sid] = (split, label)
    labels = dict(zip(index.sample_ids, index.labels))
    splits = dict(zip(index.sample_ids, index.splits))
    assert seen == {s: (splits[s], labels[s]) for s in index.sample_ids}
    # the split is fixed: writing again gives the same holdout
    assert set(pack.write_digits(tmp_path / "again").split_ids("test")) == test_ids


def test_loaders_split_by_worker_and_cover_exactly_once(tmp_path):
    index = pack.write_digits(tmp_path / "digits", shard_size=100)
    labels = index.labels_of("cv")
    keep = {s: labels[s] for s in index.split_ids("cv")[::3]}
    ids = []
    transform = transforms.ImageTransform(16, 1)
    for _images, batch_labels, batch_ids in loaders.eval_loader(index.urls("cv"), keep, batch_size=50,
                                                                transform=transform, num_workers=2):  # fmt: skip
        ids.extend(batch_ids)
        assert batch_labels.tolist() == [keep[s] for s in batch_ids]
    assert sorted(ids) == sorted(keep)  # 2 workers, disjoint shards: no sample twice, none lost
    batches = iter(loaders.train_loader(index.urls("cv"), keep, batch_size=32,
                                        decode=loaders.eval_decoder(transforms.ImageTransform(16, 1)),
                                        num_workers=0, shuffle_buffer=100, seed=0))  # fmt: skip
    drawn = [sid for _ in range(30) for sid in next(batches)[2]]
    assert set(drawn) <= set(keep) and len(set(drawn)) > 0.9 * len(keep)


def test_normalise_maps_uint8_to_the_configured_range():
    x = torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1)
    out = transforms.ImageTransform(8, 1, mean=(0.5,), std=(0.5,)).normalise(x)
    assert out.dtype == torch.float32 and out.flatten().tolist() == [-1.0, 1.0]


def _png(color):
    buf = io.BytesIO()
    Image.new("RGB", (10, 12), color).save(buf, format="PNG")
    return buf.getvalue()


def test_pack_image_folder_and_csv(tmp_path):
    src = tmp_path / "images"
    for cls, color in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
        (src / cls).mkdir(parents=True)
        for i in range(10):
            (src / cls / f"img.{i}.png").write_bytes(_png(color))
    samples, classes = pack.samples_from_folder(src)
    assert classes == ["cat", "dog"] and len(samples) == 20
    assert all("." not in s.sample_id and "/" not in s.sample_id for s in samples)
    index = pack.write_dataset(samples, tmp_path / "packed", classes=classes, channels=3, test_fraction=0.2,
                               limits=pack.ShardLimits(max_samples=4))  # fmt: skip
    assert len(index.split_ids("test")) == 4
    rows = [r for url in index.urls("cv") for r in _shard_rows(url, transforms.ImageTransform(8, 3))]
    red = [img for sid, img, label in rows if label == 0]
    assert red and all(img[0].float().mean() > 200 and img[2].float().mean() < 50 for img in red)

    with open(tmp_path / "list.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "group"])
        for i, s in enumerate(sorted((src / "dog").glob("*.png")) + sorted((src / "cat").glob("*.png"))):
            w.writerow([s.relative_to(tmp_path), "dog" if "dog" in str(s) else "cat", f"g{i // 2}"])
    samples, classes = pack.samples_from_csv(tmp_path / "list.csv")
    assert classes == ["cat", "dog"] and {s.group for s in samples} == {f"g{i}" for i in range(10)}


def _class_folder(root, classes, per_class, mode="RGB", size=(40, 30)):
    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 255, size=(size[1], size[0], 3 if mode == "RGB" else 1), dtype=np.uint8)
            Image.fromarray(pixels.squeeze()).convert(mode).save(root / name / f"{i}.jpg", quality=90)


def test_pack_mixes_classes_in_every_shard_and_sizes_shards_by_bytes(tmp_path):
    """Packing class by class left whole shards of one class (and shuffle buffers with few classes per
    batch); samples now go into the shards in a seeded random order, shards end at a byte size."""
    _class_folder(tmp_path / "imgs", ["a", "b", "c", "d"], per_class=30)
    samples, classes = pack.samples_from_folder(tmp_path / "imgs")
    assert all(s.path is not None and s.image_bytes == b"" for s in samples)  # nothing read until written
    total = sum(s.nbytes for s in samples)
    limits = pack.ShardLimits(max_mb=total / 1e6 / 8, min_shards=1)  # about 8 shards over both splits
    index = pack.write_dataset(samples, tmp_path / "packed", classes=classes, test_fraction=0.2, limits=limits)
    assert len(index.cv_shards) >= 5
    for url in index.urls("cv"):
        labels = {label for _, _, label in _shard_rows(url, transforms.ImageTransform(8, 3))}
        assert len(labels) >= 2, url
        assert (tmp_path / "packed" / url.split("/")[-1]).stat().st_size <= limits.max_mb * 1e6 + 20_000
    assert index.channels == 3
    again = pack.write_dataset(samples, tmp_path / "again", classes=classes, test_fraction=0.2, limits=limits)

    def ids_by_shard(ix):
        return [[sid for sid, _, _ in _shard_rows(url, transforms.ImageTransform(8, 3))] for url in ix.urls("cv")]

    assert ids_by_shard(again) == ids_by_shard(index)  # the order is seeded: the same shards again


def test_pack_detects_grayscale_and_keeps_enough_shards_for_many_readers(tmp_path):
    _class_folder(tmp_path / "gray", ["x", "y"], per_class=20, mode="L")
    samples, classes = pack.samples_from_folder(tmp_path / "gray")
    index = pack.write_dataset(samples, tmp_path / "packed", classes=classes, limits=pack.ShardLimits(min_shards=8))
    assert index.channels == 1  # all grayscale; one colour image would make it 3
    assert len(index.cv_shards) >= 8  # 256 MB shards would have given one: too few for 8 readers
    (tmp_path / "gray" / "x" / "broken.jpg").write_bytes(b"not an image")
    samples, classes = pack.samples_from_folder(tmp_path / "gray")
    with pytest.raises(errors.DataError, match=r"broken.jpg: not an image PIL can read"):
        pack.write_dataset(samples, tmp_path / "bad", classes=classes)
    assert not (tmp_path / "bad").exists() and not list(tmp_path.glob(".bad.*"))  # nothing half-written


def test_bad_data_is_named(tmp_path):
    with pytest.raises(errors.DataError, match="no index.json"):
        index_mod.read_index(tmp_path / "missing")
    index = pack.write_digits(tmp_path / "d")
    with pytest.raises(errors.DataError, match=r"labels outside \[0, 5\) for data.num_classes=5"):
        index_mod.read_index(index.root, num_classes=5)
    (index.root / index.test_shards[0]).unlink()
    with pytest.raises(errors.DataError, match="shard test-000000.tar listed in index.json is missing"):
        index_mod.read_index(index.root)
    with pytest.raises(errors.DataError, match="already exists"):
        pack.write_digits(index.root)
    with pytest.raises(errors.DataError, match="cannot feed 2 ranks x 4 workers"):
        loaders.check_shard_count(["a", "b"], 2, 4, "x")


def test_ensure_digits_keeps_the_copy_another_process_finished_first(tmp_path, monkeypatch):
    """Two workers start on a fresh disk: both miss the index, and while this one builds its samples the
    other renames its finished copy into place. The slower one must keep that copy, not fail
    (seen as `distrain schedule` exit codes [0, 2])."""
    root = tmp_path / "digits"
    real_samples = pack.digits_samples
    raced = []

    def samples_while_another_worker_finishes(binary=False):
        out = real_samples(binary)
        if not raced:
            raced.append(True)
            pack.write_digits(root)  # the other worker wins the race
        return out

    monkeypatch.setattr(pack, "digits_samples", samples_while_another_worker_finishes)
    pack.ensure_digits(root)
    assert raced and index_mod.read_index(root).sample_ids  # the winner's complete copy, readable
    assert [p.name for p in tmp_path.iterdir()] == ["digits"]  # no temporary directory left behind
    pack.ensure_digits(root)  # present: nothing to do


def test_ensure_digits_refuses_a_directory_without_an_index(tmp_path):
    (tmp_path / "digits").mkdir()
    (tmp_path / "digits" / "notes.txt").write_text("mine")
    with pytest.raises(errors.DataError, match="already exists"):
        pack.ensure_digits(tmp_path / "digits")
    assert [p.name for p in (tmp_path / "digits").iterdir()] == ["notes.txt"]


def test_one_transform_for_training_evaluation_and_serving(tmp_path):
    """A non-square colour JPEG read back from its shard by the loaders (training and evaluation both decode
    through `ImageTransform.decode`) and handed to the serving predictor as a PIL image or an array gives the same
    uint8 tensor and, normalised, the same model input; the transform is the backbone's timm data config."""
    from distrain.config import DataConfig
    from distrain.serving.predictor import EnsemblePredictor

    rng = np.random.default_rng(1)
    path = tmp_path / "imgs" / "a" / "photo.jpg"
    path.parent.mkdir(parents=True)
    Image.fromarray(rng.integers(0, 255, (30, 50, 3), dtype=np.uint8)).save(path, quality=95)
    (tmp_path / "imgs" / "b").mkdir()
    Image.fromarray(rng.integers(0, 255, (30, 50, 3), dtype=np.uint8)).save(tmp_path / "imgs" / "b" / "x.jpg")
    samples, classes = pack.samples_from_folder(tmp_path / "imgs")
    index = pack.write_dataset(samples, tmp_path / "packed", classes=classes, test_fraction=0)
    transform = transforms.resolve_transform("test_resnet", DataConfig(image_size=24), index.channels)
    pretrained = __import__("timm").models.get_pretrained_cfg("test_resnet")
    assert (transform.interpolation, transform.crop_pct, transform.mean) == (
        pretrained.interpolation,
        pretrained.crop_pct,
        tuple(pretrained.mean),
    )
    from_shard = {sid: img for url in index.urls("cv") for sid, img, _ in _shard_rows(url, transform)}
    from_loader = next(iter(loaders.eval_loader(index.urls("cv"), None, batch_size=8, transform=transform,
                                                num_workers=0)))  # fmt: skip
    from distrain.serving.predictor import _as_image

    serving = object.__new__(EnsemblePredictor)  # to_batch needs no loaded models
    sid = pack.safe_sample_id("a/photo")
    for image in (Image.open(path), np.asarray(Image.open(path))):
        served = serving.to_batch([(_as_image(image),)], transform)[0]
        assert served.shape == (3, 24, 24) and torch.equal(served, from_shard[sid])
        assert torch.equal(served, from_loader[0][from_loader[2].index(sid)])
        assert torch.equal(transform.normalise(served[None]), transform.normalise(from_shard[sid][None]))


def test_data_config_overrides_and_bad_values(tmp_path):
    from distrain.config import DataConfig, load_config

    t = transforms.resolve_transform("test_resnet", DataConfig(image_size=16, interpolation="bilinear", crop_pct=1.0,
                                                              mean=[0.5], std=[0.25]), channels=3)  # fmt: skip
    assert (t.interpolation, t.crop_pct, t.mean, t.std) == ("bilinear", 1.0, (0.5,) * 3, (0.25,) * 3)
    gray = transforms.resolve_transform("resnet50", DataConfig(image_size=16), channels=1)  # ImageNet statistics
    assert len(gray.mean) == 1 and gray.mean[0] == pytest.approx(np.mean((0.485, 0.456, 0.406)))
    assert gray.interpolation == "bicubic" and gray.crop_pct == 0.95  # timm's resnet50 (a1_in1k) data config
    with pytest.raises(errors.ConfigError, match=r"data.mean: invalid value \[0.1, 0.2\]"):
        load_config(None, ["data.mean=[0.1,0.2]"])
    with pytest.raises(errors.ConfigError, match="data.interpolation: invalid value 'cubic'"):
        load_config(None, ["data.interpolation=cubic"])


def test_pack_a_multilabel_csv_and_read_label_rows_back(tmp_path):
    (tmp_path / "img").mkdir()
    cells = ["cat dog", "dog|bird", "", "bird; cat", "cat"] * 8  # spaces, | and ; separate; empty: no label
    with open(tmp_path / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        for i, cell in enumerate(cells):
            (tmp_path / "img" / f"{i}.png").write_bytes(_png((i * 5, 0, 0)))
            w.writerow([f"img/{i}.png", cell])
    samples, classes = pack.samples_from_csv(tmp_path / "labels.csv", label_sets=True)
    assert classes == ["bird", "cat", "dog"]
    assert [s.label for s in samples[:5]] == [(1, 2), (0, 2), (), (0, 1), (1,)]
    index = pack.write_dataset(samples, tmp_path / "packed", classes=classes, test_fraction=0.25,
                               limits=pack.ShardLimits(max_samples=8))  # fmt: skip
    assert index.label_sets and len(index.split_ids("test")) == 10
    rows = {**index.labels_of("cv"), **index.labels_of("test")}
    assert rows["img_0"] == (0, 1, 1) and rows["img_2"] == (0, 0, 0) and rows["img_3"] == (1, 1, 0)
    loader = loaders.eval_loader(index.urls("cv"), index.labels_of("cv"), batch_size=7,
                                 transform=transforms.ImageTransform(8, 3), num_workers=0)  # fmt: skip
    for _images, labels, ids in loader:  # the loaders hand the rows on as [B, L] tensors
        assert labels.shape == (len(ids), 3) and [tuple(r) for r in labels.tolist()] == [rows[s] for s in ids]
    with pytest.raises(errors.DataError, match="task multiclass needs one label per sample"):
        index_mod.read_index(index.root, task="multiclass")
    with pytest.raises(
        errors.DataError, match=r"task multilabel needs label sets \(a data set packed with --multilabel\)"
    ):
        index_mod.read_index(pack.write_digits(tmp_path / "digits").root, task="multilabel")
    digits = pack.write_digits(tmp_path / "props", task="multilabel")
    assert digits.classes == list(DIGIT_PROPERTIES) and index_mod.read_index(digits.root, 4, "multilabel")


def test_loader_workers_outlive_a_group_sigterm_and_a_process_with_live_workers_still_exits(tmp_path):
    """DataLoader workers ignore SIGTERM (a preemption signals the whole process group, and accelerate's launcher
    every descendant): the stream goes on after one. A process exiting while a loader's persistent workers are alive
    still exits at once (its exit hook SIGKILLs them; multiprocessing's own would SIGTERM them and wait for good)."""
    import os
    import subprocess
    import sys
    import time

    from conftest import REPO

    pack.write_digits(tmp_path / "digits", shard_size=200)
    code = (
        "import os, sys\n"
        "from distrain.data.index import read_index\nfrom distrain.data import loaders\n"
        "from distrain.data.transforms import ImageTransform\n"
        "idx = read_index(sys.argv[1])\n"
        "it = iter(loaders.train_loader(idx.urls('cv'), idx.labels_of('cv'), batch_size=16, num_workers=2,\n"
        "    decode=loaders.eval_decoder(ImageTransform(16, 1)), shuffle_buffer=10, seed=0))\n"
        "import signal, time\n"
        "signal.signal(signal.SIGTERM, lambda *a: None)\n"
        "next(it)\n"
        "os.killpg(os.getpgid(0), signal.SIGTERM)\n"
        "time.sleep(0.5)\n"
        "for _ in range(30):\n"
        "    next(it)\n"
        "print('streaming', flush=True)\n"
    )
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "digits")], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)}, start_new_session=True)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "streaming" and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert time.monotonic() - start < 30
