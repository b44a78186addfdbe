"""DeepSpeed ZeRO: the launch/ JSONs, their checks against distrain's config, and real 2-process ZeRO-2 /
ZeRO-3 on CPU over gloo under torchrun (DeepSpeed's CPU backend has no fp16; accelerate's DeepSpeed path
on CPU is single-process, so torchrun drives `deepspeed.initialize` directly, as on a cluster)."""

import json
import sys

import numpy as np
import pytest
import torch

from distrain.config import ConfigError, TrainConfig
from distrain.data.pack import write_digits
from distrain.distributed.zero import load_deepspeed_config

from conftest import REPO, RUN_PY, free_port, run_cmd, run_in

JSONS = sorted((REPO / "launch" / "deepspeed").glob("*.json"))


def launch_two(launcher, args, cwd, timeout=300):
    """2 CPU processes over gloo, started by torchrun or by DeepSpeed's own launcher."""
    if launcher == "torchrun":
        head = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
    else:
        head = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2"]
    return run_cmd(
        head + ["--master_port", str(free_port()), *map(str, args)],
        cwd,
        timeout=timeout,
        env={"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", "OMP_NUM_THREADS": "1"},
    )


@pytest.mark.parametrize("path", JSONS, ids=lambda p: p.name)
def test_launch_deepspeed_json_has_known_keys_and_resolves_auto(path):
    train = TrainConfig(batch_size=24, grad_accum_steps=3, max_grad_norm=0.5, precision="bf16")
    cfg = load_deepspeed_config(path, train, world_size=4)
    assert cfg["train_micro_batch_size_per_gpu"] == 24 and cfg["gradient_accumulation_steps"] == 3
    assert cfg["train_batch_size"] == 24 * 3 * 4 and cfg["gradient_clipping"] == 0.5
    assert cfg["bf16"]["enabled"] is True and cfg["fp16"]["enabled"] is False
    assert "auto" not in json.dumps(cfg)
    assert json.loads(path.read_text())["zero_optimization"]["stage"] in (1, 2, 3)


def test_accelerate_deepspeed_yamls_name_existing_jsons():
    import yaml

    yamls = sorted((REPO / "launch" / "accelerate").glob("deepspeed_*.yaml"))
    assert {p.name for p in yamls} == {"deepspeed_zero2.yaml", "deepspeed_zero3.yaml"}
    for p in yamls:
        cfg = yaml.safe_load(p.read_text())
        assert cfg["distributed_type"] == "DEEPSPEED"
        assert (REPO / cfg["deepspeed_config"]["deepspeed_config_file"]).is_file()


def test_every_launch_file_is_covered_by_a_parse_test():
    covered = (
        set(JSONS)
        | set((REPO / "launch" / "accelerate").glob("*.yaml"))
        | {REPO / "launch" / "deepspeed" / "hostfile.example", REPO / "launch" / "README.md"}
    )
    assert set(p for p in (REPO / "launch").rglob("*") if p.is_file()) == covered


def test_deepspeed_hostfile_example_parses():
    from deepspeed.launcher.runner import fetch_hostfile

    hosts = fetch_hostfile(str(REPO / "launch" / "deepspeed" / "hostfile.example"))
    assert list(hosts.items()) == [("node-0", 8), ("node-1", 8)]


def _write(tmp_path, **changes):
    cfg = json.loads((REPO / "launch/deepspeed/zero2.json").read_text())
    for key, value in changes.items():
        node = cfg
        *parents, leaf = key.split("__")
        for part in parents:
            node = node[part]
        node[leaf] = value
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(cfg))
    return path


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"gradient_cliping": 1.0}, "unknown DeepSpeed key 'gradient_cliping'"),
        ({"zero_optimization__overlap_com": True}, "zero_optimization.overlap_com: Extra inputs are not permitted"),
        (
            {"train_micro_batch_size_per_gpu": 16},
            "train_micro_batch_size_per_gpu=16 disagrees with train.batch_size=32",
        ),
        ({"gradient_accumulation_steps": 4}, "gradient_accumulation_steps=4 disagrees with train.grad_accum_steps=2"),
        (
            {"train_batch_size": 64},
            "train_batch_size=64 disagrees with train.batch_size x train.grad_accum_steps x 2 processes=128",
        ),
        ({"gradient_clipping": 5.0}, "gradient_clipping=5.0 disagrees with train.max_grad_norm=1.0"),
        ({"bf16": {"enabled": True}}, "bf16.enabled=True disagrees with train.precision='no'"),
        ({"optimizer": {"type": "Adam"}}, "remove 'optimizer'"),
        ({"zero_optimization__stage": 7}, "zero_optimization"),
    ],
)
def test_inconsistent_or_unknown_deepspeed_config_is_refused(tmp_path, changes, message):
    train = TrainConfig(batch_size=32, grad_accum_steps=2, max_grad_norm=1.0)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        load_deepspeed_config(_write(tmp_path, **changes), train, world_size=2)
    assert "\n" not in str(info.value)


def test_bad_deepspeed_json_fails_before_training_with_one_line(tmp_path, capsys, monkeypatch, fresh_accelerate_state):
    bad = _write(tmp_path, train_micro_batch_size_per_gpu=16)
    overrides = ["train.batch_size=32", f"train.deepspeed={bad}", f"run_root={tmp_path / 'runs'}"]
    proc = run_in(capsys, monkeypatch, tmp_path, *overrides, f"data.root={tmp_path / 'digits'}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert lines[-1] == (
        f"distrain: error: {bad}: train_micro_batch_size_per_gpu=16 disagrees with train.batch_size=32"
    ), proc.stderr[-2000:]
    assert not (tmp_path / "runs").exists() and not (tmp_path / "digits").exists()  # nothing started


@pytest.mark.slow  # 2-process launches (10-22 s each); the quick loop keeps the single-process checks
@pytest.mark.parametrize(
    "stage, launcher, precision, persist, compiled",
    [
        (2, "deepspeed", "no", None, True),
        (2, "torchrun", "bf16", None, False),
        # ZeRO-3 with every parameter partitioned, even the stem's (read outside their hooks), compiled; ZeRO-3
        # with the launch/ JSON unchanged and not compiled is test_zero3_job_preempted_resumed_and_consolidated_...
        (3, "torchrun", "no", 0, True),
    ],
)
def test_two_process_zero_consolidated_weights_predict_like_the_engine(
    tmp_path, stage, launcher, precision, persist, compiled
):
    """Trains with gradient checkpointing (timm's + the fused stem segment) from the launch/ JSON, and
    with train.compile (aot_eager) where `compiled`: the engine compiles its module in place."""
    write_digits(tmp_path / "digits", shard_size=200)
    out = tmp_path / "out"
    out.mkdir()
    ds_json = REPO / "launch" / "deepspeed" / f"zero{stage}.json"
    if persist is not None:
        cfg = json.loads(ds_json.read_text())
        cfg["zero_optimization"]["stage3_param_persistence_threshold"] = persist
        ds_json = tmp_path / ds_json.name
        ds_json.write_text(json.dumps(cfg))
    proc = launch_two(
        launcher,
        [
            REPO / "tests" / "scripts" / "zero_check.py",
            ds_json,
            tmp_path / "digits",
            out,
            precision,
            "aot_eager" if compiled else "",
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    n = rows[0]["n_params"]
    for row in rows:
        assert row["engine"] == "DeepSpeedEngine" and row["stage"] == stage and row["world"] == 2
        assert row["compiled"] == compiled, row
        # each rank holds about half of the parameters (ZeRO-3) / fp32 master weights (ZeRO-2)
        assert 0.45 * n <= row["local_param_elems"] <= 0.55 * n, row
        # fp32: identical up to float rounding; bf16: the engine computes with bf16 copies of the fp32 masters
        tolerance = 1e-5 if precision == "no" else 0.05
        assert row["max_abs_diff_plain_vs_engine"] <= tolerance * max(1.0, row["logit_scale"]), row
        assert row["input_dtype"] == ("torch.float32" if precision == "no" else "torch.bfloat16")
        assert row["buffer_dtypes"] in (["torch.float32", "torch.int64"], ["torch.float32"]), row  # plain fp32 out
        assert row["resume_max_diff"] <= 1e-6 and row["moved_since_ckpt"] > 1e-3, row
        assert len(row["grad_norms"]) == 3 and all(np.isfinite(row["grad_norms"]))
    assert rows[0]["logit_scale"] == rows[1]["logit_scale"]  # ranks agree (BatchNorm statistics synced)
    assert rows[0]["grad_norms"] == rows[1]["grad_norms"]
    assert rows[0]["zero_to_fp32_params_covered"] and rows[0]["zero_to_fp32_unknown_keys"] == []
    assert rows[0]["zero_to_fp32_max_diff"] <= 1e-7  # our gather == DeepSpeed's own consolidation


@pytest.mark.slow  # 2-process launches, twice
def test_zero3_job_preempted_resumed_and_consolidated_under_torchrun(tmp_path):
    """The main job with ZeRO-3 on 2 CPU processes: engine checkpoints every step (pruned to keep=2); SIGTERM
    stops it with its state saved; the rerun resumes from it; the best consolidated weights in best.pt
    reproduce the job's OOF probabilities in a plain timm model."""
    import os
    import signal
    import subprocess
    import time

    args = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        str(RUN_PY),
        "--config",
        str(REPO / "configs" / "digits.yaml"),
        "model.names=[test_resnet]",
        "cv.folds=2",
        "cv.only_folds=[0]",
        "cv.seeds=[3]",
        "train.epochs=2",
        "train.batch_size=16",
        "data.image_size=16",
        "train.progress=false",
        "ensemble.stacking=false",
        "ensemble.register_model=false",
        "scheduler.checkpoint_every_s=0",
        "scheduler.keep_checkpoints=2",
        f"train.deepspeed={REPO / 'launch/deepspeed/zero3.json'}",
        f"run_root={tmp_path / 'runs'}",
        f"data.root={tmp_path / 'digits'}",
    ]
    env = {**os.environ, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("MLFLOW_TRACKING_URI", None)
    job = tmp_path / "runs" / "digits" / "jobs" / "test_resnet-s3-f0"
    state = job / "state"
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and len(list(state.glob("state-*.pt"))) < 2 and first.poll() is None:
        time.sleep(0.2)
    assert first.poll() is None, "the job finished before it could be preempted"
    first.send_signal(signal.SIGTERM)  # torchrun forwards it to both ranks
    first.wait(timeout=120)
    log.close()
    first_log = (tmp_path / "first.log").read_text()
    assert first.returncode != 0 and "stopped by SIGTERM" in first_log, first_log[-3000:]
    kept = sorted(p.stem for p in state.glob("state-*.pt"))
    tags = sorted(p.name for p in (state / "deepspeed").iterdir() if p.is_dir())
    assert len(kept) == 2 and tags == kept, (kept, tags)  # engine checkpoints pruned with distrain's

    second = run_cmd(
        args, tmp_path, timeout=400, env={"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", "OMP_NUM_THREADS": "1"}
    )
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-4000:]
    assert f"resumed from {state / kept[-1]}.pt" in second.stdout, second.stdout[-3000:]
    assert (tmp_path / "runs" / "digits" / "report.json").is_file()

    from distrain.data.loaders import eval_loader
    from distrain.data.transforms import ImageTransform
    from distrain.training.models import create_model

    best = torch.load(job / "best.pt", weights_only=True)
    oof = np.load(job / "oof.npz")
    model = create_model("test_resnet", num_classes=10, in_chans=1)
    model.load_state_dict(best["model"])  # strict: a plain single-device state dict
    model.eval()
    keep = set(oof["sample_ids"].tolist())
    urls = sorted(str(p) for p in (tmp_path / "digits").glob("cv-*.tar"))
    probs = {}
    with torch.no_grad():
        for images, _labels, ids in eval_loader(
            urls, dict.fromkeys(keep, -1), batch_size=64, transform=ImageTransform(16, 1), num_workers=0
        ):
            for i, p in zip(ids, torch.softmax(model(ImageTransform(16, 1).normalise(images)), 1).numpy()):
                probs[i] = p
    ours = np.stack([probs[i] for i in oof["sample_ids"].tolist()])
    np.testing.assert_allclose(ours, oof["probs"], atol=1e-5)


@pytest.mark.slow  # a 2-process launch
def test_accelerate_launch_with_the_deepspeed_yaml_uses_the_plugin(tmp_path):
    """`accelerate launch --config_file launch/accelerate/deepspeed_zero2.yaml` (the GPU users' command) builds
    the engine through accelerate's DeepSpeed plugin from distrain's resolved JSON. On CPU that plugin runs
    one process, so this checks the wiring, not the sharding (the torchrun tests above do that), with
    gradient checkpointing and the engine's own torch.compile on."""
    proc = run_cmd(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            "launch/accelerate/deepspeed_zero2.yaml",
            "--num_processes",
            "1",
            "--main_process_port",
            str(free_port()),
            str(RUN_PY),
            "--config",
            "configs/digits.yaml",
            "model.names=[test_resnet]",
            "cv.folds=2",
            "cv.only_folds=[0]",
            "cv.seeds=[3]",
            "train.epochs=1",
            "train.batch_size=32",
            "data.image_size=16",
            "train.progress=false",
            "ensemble.stacking=false",
            "ensemble.register_model=false",
            f"run_root={tmp_path / 'runs'}",
            f"data.root={tmp_path / 'digits'}",
            "model.grad_checkpointing=true",
            "train.compile=true",
            "train.compile_backend=aot_eager",
        ],
        REPO,
        timeout=400,
        env={"OMP_NUM_THREADS": "2"},
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert (
        "test_resnet-s3-f0: DeepSpeed ZeRO-2 over 1 process via accelerate's DeepSpeed plugin, float32, "
        "gradient checkpointing (timm+stem), torch.compile (aot_eager)"
    ) in proc.stdout, proc.stdout[-3000:]
    assert (tmp_path / "runs" / "digits" / "report.json").is_file()


def test_ema_under_zero3_and_a_batch_size_schedule_are_refused():
    """ZeRO-3 partitions the weights, so no rank holds what an EMA must average after each step."""
    train = TrainConfig(batch_size=24, ema_decay=0.999)
    with pytest.raises(ConfigError, match="train.ema_decay needs every rank to hold the full weights"):
        load_deepspeed_config(REPO / "launch" / "deepspeed" / "zero3.json", train, world_size=2)
    assert load_deepspeed_config(REPO / "launch" / "deepspeed" / "zero2.json", train, world_size=2)
    with pytest.raises(ConfigError, match="DeepSpeed fixes the micro-batch size"):
        load_deepspeed_config(JSONS[0], TrainConfig(batch_size_schedule={0: 64, 2: 32}), world_size=2)
