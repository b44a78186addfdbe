"""Optimisers from timm's factory: the default AdamW without decay on 1-d parameters, SGD with Nesterov
momentum, layer-wise LR decay that the schedule keeps, stochastic depth, and bad names refused."""

import pytest
import torch

from distrain.config import ConfigError, OptimConfig, load_config
from distrain.training.models import create_model
from distrain.training.optim import create_optimizer, create_scheduler

from conftest import requires_gpu


def test_default_is_adamw_without_weight_decay_on_biases_and_norms():
    model = create_model("test_resnet", num_classes=10, in_chans=1)
    opt = create_optimizer(model, OptimConfig(lr=1e-3, weight_decay=0.05))
    assert type(opt) is torch.optim.AdamW
    by_decay = {g["weight_decay"]: g["params"] for g in opt.param_groups}
    assert set(by_decay) == {0.0, 0.05}
    assert all(p.ndim <= 1 for p in by_decay[0.0]) and all(p.ndim > 1 for p in by_decay[0.05])
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    assert all(g["lr"] == 1e-3 for g in opt.param_groups)


def test_sgd_is_nesterov_momentum():
    opt = create_optimizer(
        create_model("test_resnet", num_classes=10, in_chans=1), OptimConfig(name="sgd", momentum=0.8)
    )
    assert type(opt) is torch.optim.SGD
    assert all(g["nesterov"] and g["momentum"] == 0.8 for g in opt.param_groups)


def test_layer_decay_scales_lrs_from_the_head_down_and_the_schedule_keeps_the_ratios():
    model = create_model("test_convnext", num_classes=10, in_chans=3)
    cfg = OptimConfig(lr=1e-3, layer_decay=0.5, warmup_fraction=0.0, schedule="cosine")
    opt = create_optimizer(model, cfg)
    lrs = [g["lr"] for g in opt.param_groups]
    assert max(lrs) == pytest.approx(1e-3) and min(lrs) < 1e-3 / 4  # several layer groups, halving each
    head = {id(p) for p in model.get_classifier().parameters()}
    assert all(g["lr"] == pytest.approx(1e-3) for g in opt.param_groups if any(id(p) in head for p in g["params"]))
    scheduler = create_scheduler(opt, cfg, total_steps=10, steps_per_epoch=5)
    opt.step()
    scheduler.step()
    after = [g["lr"] for g in opt.param_groups]
    assert after[0] < lrs[0] and all(a / b == pytest.approx(after[0] / lrs[0]) for a, b in zip(after, lrs))


def test_drop_path_rate_reaches_the_model():
    model = create_model("test_convnext", num_classes=10, in_chans=3, drop_path_rate=0.2)
    rates = [m.drop_prob for m in model.modules() if type(m).__name__ == "DropPath"]
    assert rates and max(rates) == pytest.approx(0.2)


def test_unknown_optimizer_is_refused_in_one_line():
    with pytest.raises(ConfigError, match=r"optim.name: timm has no optimizer 'adamz' \(similar: .*adamw"):
        load_config(None, ["optim.name=adamz"])


def test_per_model_overrides_reach_the_optimiser_the_job_and_its_mlflow_params(tmp_path, fresh_accelerate_state):
    from distrain.data.index import read_index
    from distrain.data.pack import write_digits
    from distrain.distributed import runtime
    from distrain.orchestration.phases import job_params
    from distrain.study.folds import build_fold_manifest
    from distrain.study.plan import Job
    from distrain.training.loop import JobControl, JobTrainer

    index = read_index(write_digits(tmp_path / "digits").root)
    convnext = "model.overrides.test_convnext"
    cfg = load_config(None, [f"data.root={index.root}", "model.names=[test_resnet,test_convnext]", "optim.lr=1e-3",
                             f"{convnext}.optim.lr=3e-4", f"{convnext}.optim.name=sgd",
                             f"{convnext}.train.batch_size=16", "data.num_workers=0"])  # fmt: skip
    labels = index.labels_of("cv")
    manifest = build_fold_manifest(list(labels), list(labels.values()), 5, 0)
    acc = runtime.create_accelerator(cfg.train)
    seen = {}
    for name in ("test_resnet", "test_convnext"):
        job = Job(name, 1, 0)
        trainer = JobTrainer(job, cfg.for_model(name), index, manifest.fold_of_sample, acc, None, "", JobControl())
        optimizer = trainer.scheduler.optimizer
        seen[name] = (type(optimizer).__name__, trainer.scheduler.base_lrs[0], trainer.cfg.train.batch_size)
        assert job_params(cfg, job)["optim.lr"] == seen[name][1]
    assert seen == {"test_resnet": ("AdamW", 1e-3, 64), "test_convnext": ("SGD", 3e-4, 16)}


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.overrides.test_vit.optim.lr=1e-4", "model.overrides: invalid value 'test_vit'"),
        (
            "model.overrides.test_resnet.train.metric=f1_macro",
            "model.overrides.test_resnet: invalid value 'train.metric'",
        ),
        ("model.overrides.test_resnet.optim.lrr=1", "model.overrides.test_resnet: optim.lrr: unknown key"),
        ("model.overrides.test_resnet.optim.lr=-1", r"model.overrides.test_resnet: optim.lr: invalid value -1.0"),
    ],
)
def test_bad_overrides_are_refused_in_one_line(override, message):
    with pytest.raises(ConfigError, match=message) as e:
        load_config(None, ["model.names=[test_resnet]", override])
    assert "\n" not in str(e.value)


def test_importing_timm_optim_keeps_torch_dynamo_settings():
    """timm.optim's import raises dynamo's recompile limit for the whole process (a compiled ZeRO-3 test went
    from 17 s to 90 s); distrain imports it through `timm_optim`, which puts the limit back."""
    import subprocess
    import sys

    probe = "import torch._dynamo as d; b = d.config.cache_size_limit; {imp}; print(b, d.config.cache_size_limit)"
    plain = subprocess.run(
        [sys.executable, "-c", probe.format(imp="import timm.optim")], capture_output=True, text=True
    )
    ours_import = "from distrain.config import timm_optim; timm_optim()"
    ours = subprocess.run([sys.executable, "-c", probe.format(imp=ours_import)], capture_output=True, text=True)
    before, after = plain.stdout.split()
    assert before != after  # the side effect exists (else this test would prove nothing)
    assert ours.stdout.split() == [before, before]


def test_fused_adamw_is_torchs_fused_kernel_and_other_optimizers_ignore_the_flag():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    fused = create_optimizer(model, OptimConfig(name="adamw"), fused=True)
    assert isinstance(fused, torch.optim.AdamW) and fused.defaults["fused"] is True
    model(torch.randn(8, 4)).sum().backward()
    fused.step()  # torch >= 2.4 has the fused AdamW kernel on CPU too
    plain = create_optimizer(model, OptimConfig(name="adamw"))
    assert not plain.defaults.get("fused")
    lamb = create_optimizer(model, OptimConfig(name="lamb"), fused=True)
    assert "fused" not in lamb.defaults or not lamb.defaults["fused"]


@requires_gpu
@pytest.mark.gpu
def test_cuda_speed_settings_follow_the_config_and_yield_to_deterministic():
    from distrain.config import TrainConfig
    from distrain.distributed.runtime import apply_cuda_speed_settings

    apply_cuda_speed_settings(TrainConfig())
    assert torch.backends.cudnn.benchmark and torch.get_float32_matmul_precision() == "high"
    apply_cuda_speed_settings(TrainConfig(deterministic=True))
    assert not torch.backends.cudnn.benchmark and torch.get_float32_matmul_precision() == "highest"
