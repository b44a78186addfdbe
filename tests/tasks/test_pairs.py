"""Image pairs: packed from two arrays, read back as one sample stacked on channels, fed to a siamese network over a
timm backbone, trained and scored as a binary task."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from distrain.config import load_config
from distrain.data.index import read_index
from distrain.data.loaders import eval_loader
from distrain.data.shards import read_image, shard_samples
from distrain.data.transforms import ImageTransform
from distrain.distributed import runtime
from distrain.errors import ConfigError, DataError
from distrain.study.folds import build_fold_manifest
from distrain.study.plan import Job
from distrain.tasks import get_task
from distrain.tasks.siamese import SiameseNet
from distrain.training.models import create_model

from conftest import digit_pairs, distrain_cli


@pytest.fixture(scope="module")
def packed_pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    arrays = digit_pairs(1000)
    np.savez(root / "pairs.npz", **arrays)
    code = cli_main(
        ["data", "pack", "--npz", str(root / "pairs.npz"), "--images", "xa,xb", "--out", str(root / "data")]
    )
    assert code == 0
    return root / "data", arrays


def cli_main(argv):
    from distrain import cli

    return cli.main(argv)


def test_a_pair_is_packed_as_two_images_and_read_back_stacked_on_channels(packed_pairs):
    root, arrays = packed_pairs
    index = read_index(root, 2, "pair_binary")
    assert index.images_per_sample == 2 and index.channels == 1
    refs = {ref.sample_id: ref for url in index.urls("cv") for ref in shard_samples(url)}
    sample = index.split_ids("cv")[0]
    i = int(sample.split("-")[1])
    ref = refs[sample]
    assert ref.second is not None
    first, second = (np.asarray(Image.open(io.BytesIO(read_image(ref, s)))) for s in (False, True))
    np.testing.assert_array_equal(first, arrays["xa"][i])
    np.testing.assert_array_equal(second, arrays["xb"][i])
    transform = ImageTransform(8, 1, "nearest", 1.0)
    labels = {sample: int(arrays["y"][i])}
    ((images, got, ids),) = list(
        eval_loader(index.urls("cv"), labels, batch_size=4, transform=transform, num_workers=0)
    )
    assert images.shape == (1, 2, 8, 8) and ids == [sample] and got.tolist() == [arrays["y"][i]]
    np.testing.assert_array_equal(images[0, 0].numpy(), arrays["xa"][i])
    np.testing.assert_array_equal(images[0, 1].numpy(), arrays["xb"][i])
    normalised = ImageTransform(8, 3, mean=(0.1, 0.2, 0.3), std=(0.5, 0.5, 0.5)).normalise(torch.zeros(1, 6, 2, 2))
    assert normalised[0, :, 0, 0].tolist() == pytest.approx([-0.2, -0.4, -0.6] * 2)  # each image its statistics


def test_single_images_and_pairs_are_not_mixed_up(packed_pairs, tmp_path, capsys):
    root, _ = packed_pairs
    with pytest.raises(DataError, match=r"task binary takes 1 image\(s\) per sample; index.json says 2"):
        read_index(root, 2, "binary")
    np.savez(tmp_path / "bad.npz", xa=np.zeros((4, 8, 8), np.uint8), xb=np.zeros((3, 8, 8), np.uint8), y=np.arange(4))
    proc = distrain_cli(capsys, "data", "pack", "--npz", str(tmp_path / "bad.npz"), "--images", "xa,xb", "--out",
                        str(tmp_path / "out"))  # fmt: skip
    assert proc.returncode == 2 and "'xb' has 3 rows, images 'xa' 4" in proc.stderr and not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="model.comparison"):
        load_config(None, ["task=pair_binary", "data.source=shards", "data.num_classes=2", "model.comparison=[dot]"])


@pytest.mark.parametrize("comparison", [("abs_diff", "product"), ("cosine", "l2", "residual"), ("concat",)])
def test_the_siamese_network_shares_one_encoder_and_compares_the_embeddings(comparison):
    torch.manual_seed(0)
    net = SiameseNet(create_model("test_resnet", num_classes=0, in_chans=1), 2, comparison).eval()
    a, b = torch.randn(3, 1, 16, 16), torch.randn(3, 1, 16, 16)
    logits = net(torch.cat([a, b], 1))
    assert logits.shape == (3, 2)
    swapped = net(torch.cat([b, a], 1))
    symmetric = "concat" not in comparison  # |a-b|, a*b, cos and l2 do not care which image comes first
    assert torch.allclose(logits, swapped, atol=1e-5) == symmetric
    logits.sum().backward()
    assert all(p.grad is not None for p in net.encoder.parameters() if p.requires_grad)
    assert sum(isinstance(m, type(net.encoder)) for m in net.modules()) == 1  # one encoder, used twice


def test_a_pair_task_trains_a_siamese_network_and_scores_it_as_binary(packed_pairs, fresh_accelerate_state):
    from distrain.training.loop import fit_job

    root, arrays = packed_pairs
    index = read_index(root, 2, "pair_binary")
    labels = index.labels_of("cv")
    task = get_task("pair_binary")
    strata = task.fold_strata(np.asarray(list(labels.values())), 2)
    manifest = build_fold_manifest(list(labels), strata, 2, 0)
    cfg = load_config(None, ["task=pair_binary", "data.source=shards", f"data.root={root}", "data.num_classes=2",
                             "train.metric=roc_auc", "train.epochs=4", "model.names=[test_resnet]",
                             "data.image_size=16", "data.num_workers=0", "train.progress=false",
                             "model.comparison=[abs_diff,cosine]"])  # fmt: skip
    result = fit_job(
        Job("test_resnet", 1, 0), cfg, index, manifest.fold_of_sample, runtime.create_accelerator(cfg.train)
    )
    oof = result.oof
    assert oof.probs.shape == (len(oof.sample_ids), 2) and np.allclose(oof.probs.sum(1), 1.0, atol=1e-5)
    assert result.val_score == pytest.approx(task.score("roc_auc", oof.labels, oof.probs), abs=1e-12)
    assert any(k.startswith("fuse.") for k in result.best_state) and any(
        k.startswith("encoder.") for k in result.best_state
    )
    print(f"pair_binary test_resnet: val roc_auc {result.val_score:.4f} after 4 epochs")
    assert result.val_score > 0.6  # "same digit?" is learnable: 4 epochs of 400 pairs at 16 px


def test_the_digits_pairs_demo_is_balanced_and_no_image_crosses_a_group(tmp_path):
    from collections import defaultdict

    from distrain.data.pack import write_digits

    index = write_digits(tmp_path / "pairs", task="pair_binary")
    assert index.images_per_sample == 2 and index.classes == ["different", "same"]
    labels = dict(zip(index.sample_ids, index.labels))
    assert sum(labels.values()) * 2 == len(labels) and len(labels) > 2000  # half of them the same digit
    groups = dict(zip(index.sample_ids, index.groups))
    split = dict(zip(index.sample_ids, index.splits))
    images_of_group = defaultdict(set)
    for url in index.urls("cv") + index.urls("test"):
        for ref in shard_samples(url):
            images_of_group[groups[ref.sample_id]] |= {read_image(ref), read_image(ref, True)}
    owners = defaultdict(set)
    for group, images in images_of_group.items():
        for image in images:
            owners[image].add(group)
    assert max(len(g) for g in owners.values()) == 1  # an image's pairs all lie in its one block
    assert all(len({split[s] for s in groups if groups[s] == g}) == 1 for g in images_of_group)  # blocks never split


def test_a_csv_of_pairs_is_packed_with_both_images_and_a_missing_one_is_one_line(tmp_path, capsys):
    rng = np.random.default_rng(3)
    rows = ["path_a,path_b,label,group"]
    for i in range(24):
        for side in "ab":
            Image.fromarray(rng.integers(0, 256, (10, 12), dtype=np.uint8)).save(tmp_path / f"{side}{i}.png")
        rows.append(f"a{i}.png,b{i}.png,{'same' if i % 2 else 'different'},g{i // 2}")
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    proc = distrain_cli(capsys, "data", "pack", "--csv", str(tmp_path / "pairs.csv"), "--out", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    index = read_index(tmp_path / "out", 2, "pair_binary")
    assert index.images_per_sample == 2 and index.classes == ["different", "same"] and len(index.sample_ids) == 24
    ref = next(ref for url in index.urls("cv") for ref in shard_samples(url))
    i = int(ref.sample_id.split("__")[0][1:])
    for second, side in ((False, "a"), (True, "b")):
        decoded = np.asarray(Image.open(io.BytesIO(read_image(ref, second))))
        np.testing.assert_array_equal(decoded, np.asarray(Image.open(tmp_path / f"{side}{i}.png")))
    (tmp_path / "b5.png").unlink()
    proc = distrain_cli(capsys, "data", "pack", "--csv", str(tmp_path / "pairs.csv"), "--out", str(tmp_path / "again"))
    assert proc.returncode == 2 and "image not found: 'b5.png' (path_b)" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "again").exists()
