"""timm's augmentation in the loaders: per-sample seeding (independent of workers, replayed on resume), JPEG
draft decoding, the RNG left alone in the main process, the per-batch half (erasing, Mixup), bad input."""

import io
import random

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from distrain import errors
from distrain.config import AugmentConfig, load_config
from distrain.data import augment, loaders, pack
from distrain.data.shards import shard_samples
from distrain.data.transforms import ImageTransform
from distrain.tasks import get_task

TIMM_STYLE = AugmentConfig(scale=[0.3, 1.0], hflip=0.5, auto_augment="rand-m9-mstd0.5-inc1")


def _photos(root, n, size=(60, 45)):
    rng = np.random.default_rng(0)
    for i in range(n):
        cls = root / ("a" if i % 2 else "b")
        cls.mkdir(parents=True, exist_ok=True)
        small = rng.integers(0, 255, (size[1] // 5, size[0] // 5, 3), dtype=np.uint8)
        Image.fromarray(small).resize(size, Image.BICUBIC).save(cls / f"{i}.jpg", quality=90)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    _photos(root / "src", 96)
    samples, classes = pack.samples_from_folder(root / "src")
    return pack.write_dataset(samples, root / "packed", classes=classes, test_fraction=0,
                              limits=pack.ShardLimits(max_samples=16, min_shards=1))  # fmt: skip


def _stream(index, workers, start_batch=0, n=4, transform=ImageTransform(24, 3)):
    labels = index.labels_of("cv")
    loader = loaders.train_loader(index.urls("cv"), labels, batch_size=8, num_workers=workers, shuffle_buffer=1,
                                  seed=3, start_batch=start_batch,
                                  decode=loaders.train_decoder(transform, TIMM_STYLE, stream_seed=3))  # fmt: skip
    batches = iter(loader)
    return [next(batches) for _ in range(n)]


def test_each_sample_is_augmented_the_same_whatever_reads_it(photos):
    """The augmentation of a sample depends on (stream seed, pass, sample id) only: 0 or 2 workers give the
    same tensor per sample, while two samples (or one sample in another pass) differ."""
    by_id = {w: {sid: img for images, _, ids in _stream(photos, w) for sid, img in zip(ids, images)} for w in (0, 2)}
    common = set(by_id[0]) & set(by_id[2])
    assert len(common) >= 8
    assert all(torch.equal(by_id[0][s], by_id[2][s]) for s in common)
    decode = loaders.train_decoder(ImageTransform(24, 3), TIMM_STYLE, stream_seed=3)
    ref = shard_samples(photos.urls("cv")[0])[0]
    assert torch.equal(decode(ref, 0), decode(ref, 0))
    assert not torch.equal(decode(ref, 0), decode(ref, 1))


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resumed_stream_continues_where_it_stopped_without_decoding_the_skipped(photos, workers, monkeypatch):
    whole = _stream(photos, workers, n=5)
    decoded = []
    real = augment.SampleAugment.__call__
    monkeypatch.setattr(augment.SampleAugment, "__call__", lambda self, image: decoded.append(1) or real(self, image))
    resumed = _stream(photos, workers, start_batch=3, n=2)
    for (a, la, ia), (b, lb, ib) in zip(whole[3:], resumed):
        assert ia == ib and torch.equal(a, b) and torch.equal(la, lb)
    if workers == 0:  # in workers the patch is not visible; in-process, only the 2 batches were decoded
        assert len(decoded) == 2 * 8


def test_decoding_in_the_main_process_leaves_the_training_rngs_alone(photos):
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    before = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    _stream(photos, 0, n=2)
    assert torch.equal(torch.get_rng_state(), before[0]) and random.getstate() == before[1]
    assert np.array_equal(np.random.get_state()[1], before[2])


def test_large_jpegs_decode_at_reduced_size_when_the_crop_allows(tmp_path, monkeypatch):
    """A 1600x1200 JPEG cropped to 64 px is decoded at 1/8 size (PIL draft); the result stays close to the
    full decode of the same crop."""
    rng = np.random.default_rng(0)
    big = Image.fromarray(rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)).resize((1600, 1200), Image.BICUBIC)
    buf = io.BytesIO()
    big.save(buf, "JPEG", quality=92)
    cfg = AugmentConfig(scale=[0.9, 1.0], hflip=0.0, color_jitter=0.0)
    sample_augment = augment.SampleAugment(ImageTransform(64, 3, interpolation="bilinear"), cfg)
    drafted = []
    jpeg = __import__("PIL.JpegImagePlugin", fromlist=["x"]).JpegImageFile
    real_draft = jpeg.draft
    monkeypatch.setattr(jpeg, "draft", lambda self, mode, size: drafted.append(size) or real_draft(self, mode, size))
    augment.seed_sample(7)
    fast = sample_augment(Image.open(buf))
    assert drafted == [(200, 150)]
    png = io.BytesIO()
    Image.open(buf).save(png, "PNG")  # same pixels, a format without draft
    augment.seed_sample(7)
    full = sample_augment(Image.open(png))
    assert fast.shape == full.shape == (3, 64, 64)
    assert (fast.float() - full.float()).abs().mean() < 4.0  # of 255


def test_batch_augment_erases_and_mixes_on_the_device():
    x = torch.full((4, 3, 8, 8), 128, dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2, 1])
    t = ImageTransform(8, 3, mean=(0.5,) * 3, std=(0.5,) * 3)
    plain = augment.BatchAugment(t, AugmentConfig(), num_classes=3, label_smoothing=0.0, device="cpu")
    inputs, targets = plain(x, labels)
    assert torch.equal(targets, labels) and torch.allclose(inputs, t.normalise(x)) and not plain.soft_targets
    erase = augment.BatchAugment(t, AugmentConfig(re_prob=1.0), num_classes=3, label_smoothing=0.0, device="cpu")
    assert not torch.allclose(erase(x, labels)[0], t.normalise(x))
    mix = augment.BatchAugment(t, AugmentConfig(mixup=0.8, cutmix=1.0), num_classes=3, label_smoothing=0.1,
                               device="cpu")  # fmt: skip
    _, soft = mix(x, labels)
    assert mix.soft_targets and soft.shape == (4, 3) and torch.allclose(soft.sum(1), torch.ones(4))
    assert soft.max() < 1.0  # label smoothing folded into the mixed targets


@pytest.mark.parametrize(
    "override, message",
    [
        ("augment.auto_augment=rand-m9-bogus", "augment.auto_augment: timm cannot build policy 'rand-m9-bogus'"),
        ("augment.auto_augment=nonsense", "augment.auto_augment: timm cannot build policy 'nonsense'"),
        ("augment.scale=[1.0,0.5]", "augment.scale"),
        ("augment.hflip=1.5", "augment.hflip"),
        ("augment.re_mode=zeros", "augment.re_mode"),
    ],
)
def test_bad_augmentation_settings_are_refused_in_one_line(override, message):
    with pytest.raises(errors.ConfigError, match=message.replace("[", r"\[")) as e:
        load_config(None, [override])
    assert "\n" not in str(e.value)


def test_mixup_needs_an_even_batch():
    with pytest.raises(errors.ConfigError, match="train.batch_size.*even"):
        load_config(None, ["augment.mixup=0.2", "train.batch_size=33"])


@pytest.mark.parametrize("workers", [0, 1])
def test_an_undecodable_image_names_its_shard_and_sample(tmp_path, workers):
    good = io.BytesIO()
    Image.new("RGB", (20, 20), "red").save(good, "JPEG")
    url = str(tmp_path / "cv-000000.tar")
    with wds.TarWriter(url) as sink:
        sink.write({"__key__": "fine", "jpg": good.getvalue(), "cls": b"0"})
        sink.write({"__key__": "broken", "jpg": b"\xff\xd8 not really a jpeg", "cls": b"1"})
    loader = loaders.eval_loader([url], {"fine": 0, "broken": 1}, batch_size=4, transform=ImageTransform(16, 3),
                                 num_workers=workers)  # fmt: skip
    with pytest.raises(errors.DataError) as e:
        list(loader)
    assert str(e.value).startswith(f"{url}: sample 'broken': image cannot be decoded") and "\n" not in str(e.value)


def test_posterize_to_zero_bits_works_under_pillow_13():
    """timm passes 0 bits at high magnitudes, which Pillow 13 refuses; SampleAugment installs the old
    behaviour (a black image) in timm's op table."""
    from timm.data import auto_augment

    augment.SampleAugment(ImageTransform(16, 3), TIMM_STYLE)
    op = auto_augment.AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=10)
    out = op(Image.new("RGB", (8, 8), (200, 100, 50)))
    assert np.asarray(out).max() == 0


def test_evaluation_images_are_cached_only_when_the_whole_data_set_fits(photos, monkeypatch):
    t = ImageTransform(24, 3)
    assert loaders.fits_in_cache(1000, t, cache_mb=1000 * 3 * 24 * 24 / 1e6)
    assert not loaders.fits_in_cache(1001, t, cache_mb=1000 * 3 * 24 * 24 / 1e6)
    reads = []
    real = loaders.read_image
    monkeypatch.setattr(loaders, "read_image", lambda ref, second=False: reads.append(ref) or real(ref, second))
    monkeypatch.setattr(loaders, "_DECODED", {})
    labels = photos.labels_of("cv")
    for cache, expected_reads in ((False, 2 * len(labels)), (True, len(labels))):
        reads.clear()
        passes = []
        for _ in range(2):
            loader = loaders.eval_loader(
                photos.urls("cv"), labels, batch_size=16, transform=t, num_workers=0, cache=cache
            )
            passes.append({sid: img for images, _, ids in loader for sid, img in zip(ids, images)})
        assert len(reads) == expected_reads and all(torch.equal(passes[0][s], passes[1][s]) for s in labels)


def test_tta_with_identity_views_leaves_predictions_unchanged_and_averages_the_views():
    from distrain.data.transforms import TestTimeAugment
    from distrain.training.models import create_model

    SOFTMAX = get_task("multiclass").activate
    torch.manual_seed(0)
    model = create_model("test_resnet", num_classes=3, in_chans=1).eval()
    x = torch.randn(4, 1, 32, 32)
    with torch.no_grad():
        plain = torch.softmax(model(x), 1)
        assert torch.equal(TestTimeAugment().probs(model, x, SOFTMAX), plain)
        mirror_symmetric = torch.cat([x[..., :16], x[..., :16].flip(-1)], -1)  # its hflip view is itself
        torch.testing.assert_close(
            TestTimeAugment(hflip=True).probs(model, mirror_symmetric, SOFTMAX),
            torch.softmax(model(mirror_symmetric), 1),
        )
        flipped = TestTimeAugment(hflip=True, vflip=True).probs(model, x, SOFTMAX)
        views = [x, x.flip(-1), x.flip(-2)]
        torch.testing.assert_close(flipped, sum(torch.softmax(model(v), 1) for v in views) / 3)
        assert not torch.allclose(flipped, plain)
        scaled = TestTimeAugment(scales=(1.25,))
        assert [v.shape[-1] for v in scaled.views(x)] == [32, 40]
        assert scaled.probs(model, x, SOFTMAX).sum(1).allclose(torch.ones(4))
    tta = TestTimeAugment(True, False, (0.75,))
    assert TestTimeAugment.from_dict(tta.to_dict()) == tta and TestTimeAugment.from_dict(None) == TestTimeAugment()


def test_evaluation_decodes_a_large_jpeg_at_a_reduced_dct_scale_close_to_the_full_decode():
    """A 1600x1200 JPEG evaluated at 224 px (crop 0.875): decoded at 1/4 scale by PIL's draft (1.8x faster here),
    within 1.5/255 on average of the full decode; a PNG, which has no draft, decodes exactly as before."""
    import io

    from PIL import Image

    from distrain.data.transforms import ImageTransform

    y, x = np.mgrid[0:1200, 0:1600]
    noise = np.random.default_rng(0).integers(0, 20, (1200, 1600, 3))
    pixels = (np.stack([(x // 7 + y // 5) % 256, (x // 3) % 256, (y // 4) % 256], -1) + noise).clip(0, 255)
    transform = ImageTransform(224, 3, "bicubic", 0.875)
    for fmt, tolerance in (("JPEG", 1.5), ("PNG", 0.0)):
        buf = io.BytesIO()
        Image.fromarray(pixels.astype(np.uint8)).save(buf, fmt)
        drafted = Image.open(io.BytesIO(buf.getvalue()))
        out = transform.decode(drafted)
        assert drafted.size == ((400, 300) if fmt == "JPEG" else (1600, 1200))  # the decoded size
        full = Image.open(io.BytesIO(buf.getvalue()))
        full.format = None  # not a JPEG to decode(): no draft
        difference = (out.float() - transform.decode(full).float()).abs().mean().item()
        assert difference <= tolerance, (fmt, difference)
