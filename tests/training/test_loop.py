import copy
import math

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState, GradientState

from distrain.config import ConfigError, OptimConfig, load_config
from distrain.data.pack import write_digits
from distrain.distributed import runtime
from distrain.distributed.checkpointing import apply_grad_checkpointing
from distrain.distributed.wrap import wrap
from distrain.study.folds import build_fold_manifest
from distrain.study.plan import Job
from distrain.training.loop import JobControl, fit_job, steps_per_epoch
from distrain.training.models import create_model
from distrain.training.optim import lr_factor

from conftest import requires_gpu


@pytest.mark.parametrize(
    "name, how",
    [
        ("test_resnet", "timm+stem"),
        ("test_convnext", "timm+stem"),
        ("test_vit", "timm+stem"),
        ("test_efficientnet", "timm+stem"),
        ("dla46x_c", "stages"),
    ],
)
def test_grad_checkpointing_gives_same_loss_grads_and_running_stats(name, how):
    """Two training steps with and without checkpointing: same losses and gradients, and the same
    BatchNorm running statistics (recomputation in backward must not fold each batch in twice)."""
    results = []
    for ckpt in (False, True):
        torch.manual_seed(1)
        model = create_model(name, num_classes=4, in_chans=3)
        if ckpt:
            assert apply_grad_checkpointing(model) == how  # dla has no timm support: top-level stages wrapped
        model.train()
        torch.manual_seed(0)
        losses = []
        for _ in range(2):
            model.zero_grad(set_to_none=True)
            x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            losses.append(loss.item())
        assert not any("_distrain_kept_stats" in vars(m) for m in model.modules())
        results.append(
            (
                losses,
                {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
                {n: b.clone() for n, b in model.named_buffers()},
            )
        )
    (losses_a, grads_a, buffers_a), (losses_b, grads_b, buffers_b) = results
    assert losses_a == pytest.approx(losses_b, rel=1e-6)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 10
    for n in grads_a:
        torch.testing.assert_close(grads_a[n], grads_b[n], rtol=1e-4, atol=1e-6)
    assert buffers_a.keys() == buffers_b.keys()
    for n in buffers_a:
        torch.testing.assert_close(buffers_a[n], buffers_b[n], rtol=1e-5, atol=1e-6, msg=n)
    if name in ("test_resnet", "test_efficientnet", "dla46x_c"):  # BatchNorm models: the check had teeth
        assert sum(n.endswith("num_batches_tracked") for n in buffers_a) > 3
        assert all(int(b) == 2 for n, b in buffers_b.items() if n.endswith("num_batches_tracked"))


def test_grad_checkpointing_trains_the_same_job(tmp_path, fresh_accelerate_state):
    """End to end through fit_job: 2 epochs with and without model.grad_checkpointing give the same
    best weights, BatchNorm statistics and OOF probabilities (the eval-mode model uses the statistics)."""
    from distrain.data.index import read_index

    data = tmp_path / "digits"
    write_digits(data)
    index = read_index(data)
    cv, labels = index.split_ids("cv"), index.labels_of("cv")
    manifest = build_fold_manifest(cv, [labels[s] for s in cv], 5, 0)
    results = []
    for ckpt in ("false", "true"):
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        cfg = load_config(
            None,
            [
                f"data.root={data}",
                "train.epochs=2",
                "model.names=[test_resnet]",
                "data.image_size=16",
                f"model.grad_checkpointing={ckpt}",
                "train.progress=false",
            ],
        )
        results.append(
            fit_job(
                Job("test_resnet", 1, 0), cfg, index, manifest.fold_of_sample, runtime.create_accelerator(cfg.train)
            )
        )
    plain, checkpointed = results
    assert plain.best_state.keys() == checkpointed.best_state.keys()
    for k in plain.best_state:
        torch.testing.assert_close(plain.best_state[k], checkpointed.best_state[k], rtol=1e-5, atol=1e-6, msg=k)
    assert list(plain.oof.sample_ids) == list(checkpointed.oof.sample_ids)
    np.testing.assert_allclose(plain.oof.probs, checkpointed.oof.probs, atol=1e-5)


def test_model_without_any_checkpointing_support_is_refused():
    flat = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 4))  # no timm hook, no stages
    with pytest.raises(ValueError, match="supports no gradient checkpointing"):
        apply_grad_checkpointing(flat)


def test_model_names_are_checked_for_checkpointing_before_any_work():
    from distrain.training.models import check_grad_checkpointing

    assert check_grad_checkpointing("test_vit") == "timm+stem" and check_grad_checkpointing("dla46x_c") == "stages"


def _saved_activation_bytes(model, x):
    """Bytes autograd keeps for backward after one training forward (what checkpointing is meant to cut)."""
    saved = {}

    def pack(t):
        storage = t.untyped_storage()  # a tensor saved by several ops (or a view of it) counts once
        saved[storage.data_ptr()] = storage.nbytes()
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x).sum()
    del out
    return sum(saved.values())


def test_stem_checkpointing_keeps_fewer_activations_and_the_same_model():
    """timm's own checkpoints leave resnet's full-resolution stem out; the fused stem segment cuts what
    the forward keeps, without changing the state-dict keys or eval-mode outputs."""
    from distrain.distributed.checkpointing import find_stem

    x = torch.randn(4, 3, 64, 64)
    torch.manual_seed(0)
    model = create_model("test_resnet", num_classes=4, in_chans=3)
    keys = list(model.state_dict())
    names = {id(m): n for n, m in model.named_children()}
    assert [names[id(m)] for m in find_stem(model)] == ["conv1", "bn1", "act1", "maxpool"]
    none = _saved_activation_bytes(model, x)
    stages_only = copy.deepcopy(model)
    assert apply_grad_checkpointing(stages_only, stem=False) == "timm"
    assert apply_grad_checkpointing(model) == "timm+stem"
    timm_only, with_stem = _saved_activation_bytes(stages_only, x), _saved_activation_bytes(model, x)
    assert with_stem < timm_only < none
    conv1_out = 4 * model.bn1.num_features * 32 * 32 * 4  # bytes of one stride-2 stem activation
    assert timm_only - with_stem >= conv1_out
    assert list(model.state_dict()) == keys
    model.eval(), stages_only.eval()
    with torch.no_grad():  # both saw the same training forwards, so the same BatchNorm statistics
        torch.testing.assert_close(model(x), stages_only(x), rtol=0, atol=0)


def test_no_stem_where_the_model_has_no_stem_group():
    from distrain.distributed.checkpointing import find_stem

    assert find_stem(create_model("densenet121", num_classes=2, in_chans=3)) == []  # stem spread over features.*
    assert find_stem(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())) == []  # no group_matcher


def test_wrap_applies_checkpointing_then_compile_then_ddp(tmp_path, fresh_accelerate_state):
    from distrain.config import TrainConfig
    from distrain.training.optim import create_optimizer

    train = TrainConfig(compile=True, compile_backend="aot_eager", batch_size=8)
    acc = runtime.create_accelerator(train)
    model = create_model("dla46x_c", num_classes=4, in_chans=1)
    trainable = wrap(acc, model, create_optimizer(model, OptimConfig()), train, grad_checkpointing=True)
    compiled = trainable.model  # one process: accelerate adds no DDP wrapper around the compiled module
    assert type(compiled).__name__ == "OptimizedModule" and compiled._orig_mod is model
    assert trainable.single is model and "forward" in vars(model.level2)  # checkpointed stage, inside compile
    criterion = torch.nn.CrossEntropyLoss()
    x, y = torch.randn(8, 1, 32, 32), torch.randint(0, 4, (8,))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss, _, step = trainable.micro_step(x, y, criterion)
    assert torch.isfinite(loss) and step.boundary and step.applied and float(step.grad_norm) > 0
    assert set(trainable.full_state_dict()) == set(before)  # plain keys, no `_orig_mod.` prefix
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


class RecordingTracker:
    def __init__(self):
        self.rows, self.steps = [], []

    def log_metrics(self, run_id, row, step=None):
        self.rows.append(dict(row))
        self.steps.append(step)


def _nan_job(tmp_path, monkeypatch, max_nonfinite, tracker=None):
    from distrain.data.index import read_index
    from distrain.training import loop

    class PoisonedAugment(loop.BatchAugment):  # training batches only: evaluation does not augment
        def __call__(self, images, labels):
            inputs, targets = super().__call__(images, labels)
            return inputs * float("nan"), targets

    monkeypatch.setattr(loop, "BatchAugment", PoisonedAugment)
    data = tmp_path / "digits"
    write_digits(data)
    index = read_index(data)
    cfg = load_config(
        None,
        [
            f"data.root={data}",
            "train.epochs=1",
            "model.names=[test_resnet]",
            "data.image_size=16",
            f"train.max_nonfinite_losses={max_nonfinite}",
            "train.batch_size=64",
        ],
    )
    cv = index.split_ids("cv")
    labels = index.labels_of("cv")
    manifest = build_fold_manifest(cv, [labels[s] for s in cv], 5, 0)
    acc = runtime.create_accelerator(cfg.train)
    kwargs = {"tracker": tracker, "control": JobControl(first_step=3)} if tracker else {}
    return fit_job(Job("test_resnet", 1, 0), cfg, index, manifest.fold_of_sample, acc, **kwargs), manifest


def test_consecutive_nonfinite_losses_stop_the_job_with_a_clear_error(tmp_path, fresh_accelerate_state, monkeypatch):
    from distrain.errors import NonFiniteLoss

    with pytest.raises(
        NonFiniteLoss,
        match=r"test_resnet-s1-f0: \d+ consecutive non-finite losses by epoch 0 step 2 "
        r"\(train.max_nonfinite_losses=3\)",
    ):
        _nan_job(tmp_path, monkeypatch, 3)


def test_nonfinite_losses_are_counted_and_logged(tmp_path, fresh_accelerate_state, monkeypatch):
    tracker = RecordingTracker()
    result, manifest = _nan_job(tmp_path, monkeypatch, 0, tracker)  # stopping disabled: count only
    n_train = len(manifest.fold_of_sample) - sum(f == 0 for f in manifest.fold_of_sample.values())
    assert result.history[0]["nonfinite_losses"] == steps_per_epoch(n_train, 1, 64, 1)
    assert tracker.rows[0]["nonfinite_losses"] == result.history[0]["nonfinite_losses"]
    assert tracker.steps == [3]  # epoch 0 at the control's first step (a sweep trial's second fold of 3 epochs)


def test_lr_schedule_warmup_cosine_floor_and_restarts():
    cfg = OptimConfig(lr=1.0, warmup_fraction=0.1, schedule="cosine", min_lr_ratio=0.5)
    f = [lr_factor(s, total_steps=100, steps_per_epoch=10, cfg=cfg) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b - 1e-12 for a, b in zip(f[10:], f[11:]))  # monotone decay after warmup
    assert min(f[10:]) >= 0.5 and f[-1] == pytest.approx(0.5, abs=0.01)  # never below the floor
    sgdr = OptimConfig(lr=1.0, warmup_fraction=0.0, schedule="cosine_restarts", restart_epochs=2, restart_mult=2)
    g = [lr_factor(s, total_steps=140, steps_per_epoch=10, cfg=sgdr) for s in range(140)]
    restarts = [s for s in range(1, 140) if g[s] > g[s - 1] + 0.5]
    assert restarts == [20, 60]  # cycles of 2, 4, 8 epochs


def test_steps_per_epoch_rounds_to_whole_optimizer_steps():
    assert steps_per_epoch(1000, 2, 64, 1) == 7
    assert steps_per_epoch(1000, 1, 64, 4) == 12
    with pytest.raises(ValueError, match="exceeds the 100 training samples"):
        steps_per_epoch(100, 2, 64, 1)


def _tiny_job(tmp_path, precision):
    """One epoch of fold 0 at 32 px. (At 16 px test_resnet's last stage sees 1x1 feature maps, where
    oneDNN's bf16 convolution backward returns non-finite weight gradients on some Xeons.)"""
    data = tmp_path / "digits"
    index = write_digits(data) if not (data / "index.json").exists() else None
    from distrain.data.index import read_index

    index = read_index(data)
    cfg = load_config(
        None,
        [
            f"data.root={data}",
            "train.epochs=1",
            f"train.precision={precision}",
            "model.names=[test_resnet]",
            "data.image_size=32",
        ],
    )
    cv = index.split_ids("cv")
    labels = index.labels_of("cv")
    manifest = build_fold_manifest(cv, [labels[s] for s in cv], 5, 0)
    acc = runtime.create_accelerator(cfg.train)
    return fit_job(Job("test_resnet", 1, 0), cfg, index, manifest.fold_of_sample, acc), acc, manifest


def test_bf16_on_cpu_runs_under_autocast(tmp_path, fresh_accelerate_state):
    result, acc, manifest = _tiny_job(tmp_path, "bf16")
    assert acc.mixed_precision == "bf16"
    with acc.autocast():
        conv_out = torch.nn.Conv2d(1, 2, 3)(torch.randn(1, 1, 8, 8))
    assert conv_out.dtype == torch.bfloat16  # the engine's forward passes run in bf16
    assert all(math.isfinite(h["train_loss"]) for h in result.history)
    assert all(v.dtype == torch.float32 for v in result.best_state.values() if v.is_floating_point())
    assert len(result.oof.sample_ids) == sum(f == 0 for f in manifest.fold_of_sample.values())
    assert np.allclose(result.oof.probs.sum(1), 1, atol=1e-3)


def test_fp16_on_cpu_is_refused_clearly():
    with pytest.raises(ConfigError, match="'fp16' needs a CUDA GPU"):
        runtime.check_precision("fp16", cuda=False)
    runtime.check_precision("bf16", cuda=False)
    runtime.check_precision("no", cuda=False)


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_on_gpu(tmp_path, fresh_accelerate_state, precision):
    result, acc, _ = _tiny_job(tmp_path, precision)
    assert acc.device.type == "cuda"
    assert all(math.isfinite(h["train_loss"]) for h in result.history)


def test_the_validation_loader_is_built_once_per_job(tmp_path, fresh_accelerate_state, monkeypatch):
    """Rebuilt every epoch, the loader's DataLoader workers (and the shards they decoded) would be too: with 2
    workers a 4-epoch digits job took 3.70 s that way and 3.00 s with the loader kept (median of 3)."""
    from distrain.data.index import read_index
    from distrain.training import loop

    built = []
    real = loop.eval_loader
    monkeypatch.setattr(loop, "eval_loader", lambda urls, *a, **k: built.append(urls[0]) or real(urls, *a, **k))
    index = read_index(write_digits(tmp_path / "digits").root)
    cfg = load_config(None, [f"data.root={index.root}", "train.epochs=3", "model.names=[test_resnet]",
                             "data.image_size=16", "data.num_workers=2", "train.progress=false"])  # fmt: skip
    labels = index.labels_of("cv")
    manifest = build_fold_manifest(list(labels), list(labels.values()), 5, 0)
    result = fit_job(
        Job("test_resnet", 1, 0), cfg, index, manifest.fold_of_sample, runtime.create_accelerator(cfg.train)
    )
    # once each per job, not per epoch: the validation fold, the training-fold probe, the holdout
    assert len(result.history) == 3 and len(built) == 3 and sum("/cv-" in url for url in built) == 2
    assert len(result.oof.sample_ids) == sum(f == 0 for f in manifest.fold_of_sample.values())  # still every sample


def test_train_val_gap_compares_the_same_metric_on_unaugmented_images(tmp_path, fresh_accelerate_state):
    """A macro-F1 run logged a gap of 0.51 when the train side was accuracy on augmented batches. The train side
    is now the configured metric on a fixed, un-augmented training-fold sample: recomputed here from the epoch's
    weights, it matches the logged value, and the gap is that minus the validation metric."""
    from distrain.data.index import read_index
    from distrain.data.loaders import eval_loader
    from distrain.data.transforms import resolve_transform
    from distrain.tasks import get_task
    from distrain.training.loop import train_probe_ids

    index = read_index(write_digits(tmp_path / "digits").root)
    cfg = load_config(None, [f"data.root={index.root}", "train.epochs=1", "model.names=[test_resnet]",
                             "data.image_size=16", "data.num_workers=0", "train.metric=f1_macro",
                             "augment.scale=[0.3,1.0]", "train.progress=false"])  # fmt: skip
    labels = index.labels_of("cv")
    manifest = build_fold_manifest(list(labels), list(labels.values()), 5, 0)
    job = Job("test_resnet", 1, 2)
    result = fit_job(job, cfg, index, manifest.fold_of_sample, runtime.create_accelerator(cfg.train))
    row = result.history[0]
    val_ids = {s for s in labels if manifest.fold_of_sample[s] == job.fold}
    probe = train_probe_ids(set(labels) - val_ids, len(val_ids), job)
    assert len(probe) == len(val_ids) and not set(probe) & val_ids
    model = create_model("test_resnet", num_classes=10, in_chans=1)
    model.load_state_dict(result.best_state)
    model.eval()
    transform = resolve_transform("test_resnet", cfg.data, 1)
    ids, probs = [], []
    with torch.no_grad():
        for images, _, batch_ids in eval_loader(index.urls("cv"), {s: labels[s] for s in probe}, batch_size=64,
                                                transform=transform, num_workers=0):  # fmt: skip
            ids += batch_ids
            probs.append(torch.softmax(model(transform.normalise(images)), 1).numpy())
    expected = get_task("multiclass").score("f1_macro", np.array([labels[s] for s in ids]), np.concatenate(probs))
    assert row["train_eval_f1_macro"] == pytest.approx(expected, abs=1e-6)
    assert row["train_val_gap"] == pytest.approx(row["train_eval_f1_macro"] - row["val_f1_macro"])


def test_ema_weights_equal_a_hand_rolled_ema_and_compete_for_the_best_epoch(
    tmp_path, fresh_accelerate_state, monkeypatch
):
    """train.ema_decay: after every applied optimizer step (here every 2nd micro-batch) the EMA reads the
    current weights; its weights equal e_t = d_t e_(t-1) + (1 - d_t) w_t with timm's warmup decay
    d_t = min(d, 1 - t^-0.75) (d_1 = 0: a copy); it is scored every epoch, and the better of it and the raw
    weights becomes the job's best."""
    from distrain.data.index import read_index
    from distrain.training import loop

    seen_weights, emas = [], []
    real_create = loop.create_ema

    def recording_ema(model, decay, warmup):
        ema = real_create(model, decay, warmup)
        real_update = ema.update

        def update(weights, step):
            seen_weights.append((step, {k: v.detach().clone() for k, v in weights.state_dict().items()}))
            real_update(weights, step=step)

        ema.update = update
        emas.append(ema)
        return ema

    monkeypatch.setattr(loop, "create_ema", recording_ema)
    index = read_index(write_digits(tmp_path / "digits").root)
    cfg = load_config(None, [f"data.root={index.root}", "train.epochs=2", "model.names=[test_resnet]",
                             "data.image_size=16", "data.num_workers=0", "train.grad_accum_steps=2",
                             "train.ema_decay=0.99", "train.ema_warmup=true", "train.progress=false"])  # fmt: skip
    labels = index.labels_of("cv")
    manifest = build_fold_manifest(list(labels), list(labels.values()), 5, 0)
    result = fit_job(
        Job("test_resnet", 1, 0), cfg, index, manifest.fold_of_sample, runtime.create_accelerator(cfg.train)
    )
    n_train = sum(f != 0 for f in manifest.fold_of_sample.values())
    assert [s for s, _ in seen_weights] == list(range(1, 2 * steps_per_epoch(n_train, 1, 64, 2) // 2 + 1))
    expected = {}
    for step, weights in seen_weights:
        decay = 0.0 if step == 1 else min(0.99, 1 - step**-0.75)
        for k, w in weights.items():
            expected[k] = w.float().clone() if k not in expected or not w.is_floating_point() else (
                decay * expected[k] + (1 - decay) * w.float())  # fmt: skip
    ema_state = emas[0].module.state_dict()
    for k, v in expected.items():
        torch.testing.assert_close(ema_state[k].float(), v, rtol=1e-5, atol=1e-6, msg=k)
    assert not torch.equal(ema_state["fc.weight"], seen_weights[-1][1]["fc.weight"])  # an average, not a copy
    rows = result.history
    assert all("val_ema_accuracy" in r for r in rows)
    scores = [(r["val_accuracy"], "raw", r["epoch"]) for r in rows] + [
        (r["val_ema_accuracy"], "ema", r["epoch"]) for r in rows
    ]
    best = max(scores, key=lambda t: (t[0], -t[2], t[1] == "raw"))  # first epoch, raw before ema among equals
    assert (result.val_score, result.best_source, result.best_epoch) == best


def test_progressive_resolution_trains_each_phase_at_its_size_and_batch(tmp_path, fresh_accelerate_state, monkeypatch):
    """data.image_size_schedule {0: 16, 1: 24} with train.batch_size_schedule {0: 64, 1: 32}: epoch 0 trains on
    64 x 16 px batches, epoch 1 on 32 x 24 px ones, as many as each epoch's steps; validation is always at 24 px."""
    from distrain.data.augment import BatchAugment
    from distrain.data.index import read_index
    from distrain.training import loop

    shapes = []
    real_call = BatchAugment.__call__
    monkeypatch.setattr(
        BatchAugment, "__call__", lambda self, x, y: shapes.append(tuple(x.shape)) or real_call(self, x, y)
    )
    evaluated = []
    real_predict = loop.predict
    monkeypatch.setattr(
        loop,
        "predict",
        lambda m, a, loader, t, *rest: evaluated.append(t.image_size) or real_predict(m, a, loader, t, *rest),
    )
    index = read_index(write_digits(tmp_path / "digits").root)
    cfg = load_config(None, [f"data.root={index.root}", "train.epochs=2", "model.names=[test_resnet]",
                             "data.image_size=24", "data.image_size_schedule={0: 16, 1: 24}",
                             "train.batch_size_schedule={0: 64, 1: 32}", "data.num_workers=0",
                             "train.progress=false"])  # fmt: skip
    labels = index.labels_of("cv")
    manifest = build_fold_manifest(list(labels), list(labels.values()), 5, 0)
    result = fit_job(
        Job("test_resnet", 1, 0), cfg, index, manifest.fold_of_sample, runtime.create_accelerator(cfg.train)
    )
    n_train = sum(f != 0 for f in manifest.fold_of_sample.values())
    small, large = steps_per_epoch(n_train, 1, 64, 1), steps_per_epoch(n_train, 1, 32, 1)
    assert shapes == [(64, 1, 16, 16)] * small + [(32, 1, 24, 24)] * large
    assert set(evaluated) == {24} and len(result.history) == 2
    assert [loop.EpochPlan.of(cfg, e) for e in range(2)] == [loop.EpochPlan(16, 64, 0), loop.EpochPlan(24, 32, 1)]
    longer = load_config(None, ["train.epochs=5", "data.image_size_schedule={0: 16, 3: 32}",
                                "train.batch_size_schedule={0: 64, 1: 32}"])  # fmt: skip
    assert [loop.EpochPlan.of(longer, e) for e in range(5)] == [
        loop.EpochPlan(16, 64, 0), loop.EpochPlan(16, 32, 1), loop.EpochPlan(16, 32, 1), loop.EpochPlan(32, 32, 3),
        loop.EpochPlan(32, 32, 3),
    ]  # fmt: skip


def test_shards_holding_other_samples_than_the_index_are_a_data_error_duplicates_a_job_failure():
    """Samples index.json lists that no shard holds (a shard replaced by another) would fail every attempt alike:
    DataError (exit 2, not retried), naming one; rows predicted twice are a failure of the attempt."""
    from distrain.errors import DataError, JobFailure
    from distrain.study.results import Predictions
    from distrain.training.evaluate import check_coverage

    def pred(ids):
        return Predictions(list(ids), np.zeros((len(ids), 2), np.float32), np.zeros(len(ids), np.int64))

    check_coverage(pred(["a", "b"]), {"a", "b"}, "job validation")
    with pytest.raises(DataError, match="the shards hold 1 of the 2 samples .* 'b' is in index.json but in no shard"):
        check_coverage(pred(["a"]), {"a", "b"}, "job validation")
    with pytest.raises(DataError, match="1 unknown; 'z' is in no index"):
        check_coverage(pred(["a", "b", "z"]), {"a", "b"}, "job validation")
    with pytest.raises(JobFailure, match="rows predicted twice"):
        check_coverage(pred(["a", "a", "b"]), {"a", "b"}, "job validation")


@pytest.mark.slow
def test_a_stop_during_an_epochs_evaluation_saves_and_the_resumed_job_ends_bit_identical(
    tmp_path, fresh_accelerate_state, monkeypatch
):
    """SIGTERM while epoch 1's validation predictions run: the pass ends at the next batch, the job stops with the
    state of the end of epoch 1's training, and the resumed job evaluates epoch 1 again and ends with the history and
    best weights of a job never stopped (evaluation draws no random numbers and changes no weights)."""
    from distrain.data.index import read_index
    from distrain.errors import Interrupted
    from distrain.training import loop
    from distrain.training.checkpoint import load_latest_state

    data = tmp_path / "digits"
    write_digits(data)
    index = read_index(data)
    cfg = load_config(None, [f"data.root={data}", "train.epochs=2", "model.names=[test_resnet]", "data.image_size=16",
                             "train.batch_size=64", "data.num_workers=0", "train.deterministic=true"])  # fmt: skip
    cv, labels = index.split_ids("cv"), index.labels_of("cv")
    manifest = build_fold_manifest(cv, [labels[s] for s in cv], 5, 0)
    job = Job("test_resnet", 1, 0)

    def run(state_dir, stop=lambda: False):
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        acc = runtime.create_accelerator(cfg.train)
        control = JobControl(state_dir=state_dir, stop_requested=stop)
        return fit_job(job, cfg, index, manifest.fold_of_sample, acc, control=control)

    straight = run(tmp_path / "straight")
    calls, asked = [], {"stop": False}
    real_predict = loop.predict

    def predict(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # epoch 0: validation, train probe; epoch 1: validation, where the signal lands
            asked["stop"] = True
        return real_predict(*args, **kwargs)

    monkeypatch.setattr(loop, "predict", predict)
    with pytest.raises(Interrupted, match="stopped while evaluating epoch 1"):
        run(tmp_path / "stopped", stop=lambda: asked["stop"])
    assert len(calls) == 3  # the probe and the rest of the evaluation were not run
    state, _ = load_latest_state(tmp_path / "stopped")
    assert (state["epoch"], len(state["history"])) == (1, 1)
    monkeypatch.setattr(loop, "predict", real_predict)
    resumed = run(tmp_path / "stopped")
    assert [h["val_accuracy"] for h in resumed.history] == [h["val_accuracy"] for h in straight.history]
    assert resumed.best_epoch == straight.best_epoch
    for name, tensor in straight.best_state.items():
        assert torch.equal(tensor, resumed.best_state[name]), name
