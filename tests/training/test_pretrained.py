"""Starting from pretrained weights: a local checkpoint the test writes itself (no downloads), the classifier
re-made for the data's classes, the first convolution adapted to its channels, and clear refusals."""

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from safetensors.torch import save_file

from distrain.config import load_config
from distrain.data.index import read_index
from distrain.data.pack import write_digits
from distrain.distributed import runtime
from distrain.errors import ConfigError
from distrain.study.folds import build_fold_manifest
from distrain.study.plan import Job
from distrain.training.loop import JobControl, JobTrainer, fit_job
from distrain.training.models import create_model

from conftest import distrain_run, last_line


@pytest.fixture
def imagenet_like_file(tmp_path):
    """test_resnet weights as a 1000-class, 3-channel checkpoint would ship them."""
    torch.manual_seed(123)
    source = create_model("test_resnet", num_classes=1000, in_chans=3)
    path = tmp_path / "test_resnet.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    return path, source.state_dict()


def test_local_file_loads_body_remakes_head_and_adapts_the_first_conv(imagenet_like_file):
    path, weights = imagenet_like_file
    rgb = create_model("test_resnet", num_classes=10, in_chans=3, pretrained_file=str(path))
    assert torch.equal(rgb.conv1[0].weight, weights["conv1.0.weight"])
    assert torch.equal(rgb.layer1[0].conv1.weight, weights["layer1.0.conv1.weight"])
    assert rgb.fc.weight.shape == (10, weights["fc.weight"].shape[1])  # a new head for 10 classes
    gray = create_model("test_resnet", num_classes=10, in_chans=1, pretrained_file=str(path))
    # timm folds the RGB filters into one channel for grayscale input
    torch.testing.assert_close(gray.conv1[0].weight, weights["conv1.0.weight"].sum(dim=1, keepdim=True))
    scratch = create_model("test_resnet", num_classes=10, in_chans=3)
    assert not torch.equal(scratch.conv1[0].weight, weights["conv1.0.weight"])


def test_a_job_fine_tunes_from_the_file(tmp_path, imagenet_like_file):
    """Through the training loop: the model the job builds holds the file's weights before its first step,
    with a head of data.num_classes, and the job then trains from them."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    path, weights = imagenet_like_file
    index = write_digits(tmp_path / "digits")
    index = read_index(index.root)
    overrides = [f"data.root={index.root}", "train.epochs=1", "model.names=[test_resnet]", "data.image_size=32",
                 f"model.pretrained_file={path}", "train.progress=false"]  # fmt: skip
    cfg = load_config(None, overrides)
    labels = index.labels_of("cv")
    manifest = build_fold_manifest(list(labels), list(labels.values()), 5, 0)
    acc = runtime.create_accelerator(cfg.train)
    job = Job("test_resnet", 1, 0)
    trainer = JobTrainer(job, cfg, index, manifest.fold_of_sample, acc, None, "", JobControl())
    first_conv = trainer.trainable.single.conv1[0].weight
    torch.testing.assert_close(first_conv, weights["conv1.0.weight"].sum(dim=1, keepdim=True))  # 1-channel digits
    assert trainer.trainable.single.fc.weight.shape[0] == cfg.data.num_classes == 10
    result = fit_job(job, cfg, index, manifest.fold_of_sample, acc)
    assert result.best_state["fc.weight"].shape[0] == 10 and len(result.history) == 1


def test_weights_that_do_not_fit_are_one_clear_error(tmp_path):
    torch.manual_seed(0)
    other = create_model("test_convnext", num_classes=5, in_chans=3)
    path = tmp_path / "convnext.safetensors"
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(path))
    with pytest.raises(
        ConfigError, match=r"model.pretrained_file=.*: \d+ of \d+ tensors of 'test_resnet' are not in the weights"
    ) as e:
        create_model("test_resnet", num_classes=10, in_chans=1, pretrained_file=str(path))
    assert "\n" not in str(e.value)


def test_hub_weights_offline_and_not_cached_are_refused_before_any_work(tmp_path):
    """The main job with model.pretrained=true, offline and with an empty hub cache: exit 2 with one line,
    before the run directory is made."""
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "empty-hf-home")}
    proc = distrain_run(tmp_path, "model.names=[test_resnet]", "model.pretrained=true", "data.image_size=16",
                        env=env, timeout=300)  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = last_line(proc.stderr)
    assert line.startswith("distrain: error: model.pretrained=true: cannot load 'test_resnet' weights"), line
    assert "offline?" in line and "Traceback" not in proc.stderr
    assert not (tmp_path / "runs" / "digits").exists()


def test_missing_file_and_several_models_are_refused_at_config_time(tmp_path):
    with pytest.raises(ConfigError, match="model.pretrained_file: no such file: nope.pt"):
        load_config(None, ["model.names=[test_resnet]", "model.pretrained_file=nope.pt"])
    (tmp_path / "w.pt").write_bytes(b"")
    with pytest.raises(ConfigError, match="a file for a single model name"):
        load_config(None, ["model.names=[test_resnet,test_convnext]", f"model.pretrained_file={tmp_path / 'w.pt'}"])


def test_the_finetune_example_config_trains_a_step_from_a_local_file(tmp_path, imagenet_like_file):
    """configs/finetune.yaml as a user runs it (pretrained backbone, RandAugment, erasing, Mixup / CutMix, soft
    targets) with a tiny model, a local pretrained file and 32 px JPEGs: the weights are the file's before the
    first step and the job trains and predicts."""
    import numpy as np
    from PIL import Image

    from distrain.data import pack

    from conftest import REPO

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    rng = np.random.default_rng(0)
    for i in range(40):
        folder = tmp_path / "photos" / ("cat" if i % 2 else "dog")
        folder.mkdir(parents=True, exist_ok=True)
        size = (int(rng.integers(40, 80)), int(rng.integers(30, 60)))
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(folder / f"{i}.jpg")
    samples, classes = pack.samples_from_folder(tmp_path / "photos")
    index = pack.write_dataset(samples, tmp_path / "mine", classes=classes, test_fraction=0.2,
                               limits=pack.ShardLimits(max_samples=8, min_shards=1))  # fmt: skip
    path, weights = imagenet_like_file
    cfg = load_config(REPO / "configs" / "finetune.yaml", [
        f"data.root={index.root}", "data.num_classes=2", "data.image_size=32", "data.num_workers=0",
        "model.names=[test_resnet]", "model.pretrained=false", f"model.pretrained_file={path}", "train.epochs=1",
        "train.batch_size=8", "train.precision=no", "train.progress=false", "cv.folds=2"])  # fmt: skip
    assert cfg.augment.mixes and cfg.augment.auto_augment and cfg.augment.re_prob > 0
    labels = index.labels_of("cv")
    manifest = build_fold_manifest(list(labels), list(labels.values()), 2, 0)
    acc = runtime.create_accelerator(cfg.train)
    job = Job("test_resnet", 1, 0)
    trainer = JobTrainer(job, cfg, index, manifest.fold_of_sample, acc, None, "", JobControl())
    assert torch.equal(trainer.trainable.single.conv1[0].weight, weights["conv1.0.weight"])
    assert trainer.trainable.single.fc.weight.shape[0] == 2 and trainer.batch_augment.soft_targets
    assert trainer.transform.mean == tuple(__import__("timm").models.get_pretrained_cfg("test_resnet").mean)
    result = fit_job(job, cfg, index, manifest.fold_of_sample, acc)
    assert len(result.history) == 1 and np.isfinite(result.history[0]["train_loss"])
    assert result.test is not None and result.test.probs.shape == (len(index.split_ids("test")), 2)
