"""Training-state checkpoints: weights_only loading, checksums, deterministic resume after SIGKILL (with an
EMA and a resolution switch before the kill); SIGTERM mid-epoch, saved and released, is tests/e2e/test_signals.py
and the resume after it tests/distributed/test_zero.py (ZeRO-3 under torchrun)."""

import json
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from distrain.orchestration.ledger import Ledger
from distrain.training.checkpoint import load_latest_state, rng_state, save_state, set_rng_state

from conftest import RUN_PY, child_env, run_cmd

JOB = "test_resnet-s7-f0"
TINY = [
    "model.names=[test_resnet]",
    "data.image_size=24",
    "cv.folds=2",
    "cv.seeds=[7]",
    "cv.only_folds=[0]",
    "train.epochs=2",
    "train.batch_size=32",
    "train.progress=false",
    "train.deterministic=true",
    "train.ema_decay=0.9",  # the EMA's state resumes too
    "data.image_size_schedule={0: 16, 1: 24}",  # progressive resolution: killed in the first epoch at 24 px
    "train.cpu_threads=1",
    "ensemble.stacking=false",
    "ensemble.register_model=false",
    "scheduler.lease_timeout_s=1.5",
    "scheduler.heartbeat_s=0.2",
    "scheduler.poll_s=0.2",
]
STEPS = 718 // 32  # CV samples of the training fold / batch size


def test_state_roundtrip_is_weights_only_and_restores_rng(tmp_path):
    torch.manual_seed(3)
    np.random.seed(3)
    state = {"rng": rng_state(), "w": torch.ones(4)}
    save_state(tmp_path, 1, state)
    expected = (torch.rand(3), np.random.rand(3))  # what follows the saved state
    loaded, path = load_latest_state(tmp_path)
    assert path.name == "state-000000001.pt"
    torch.load(path, weights_only=True)  # raises if anything is not a plain type or tensor
    set_rng_state(loaded["rng"])
    assert torch.equal(torch.rand(3), expected[0]) and np.array_equal(np.random.rand(3), expected[1])


@pytest.mark.parametrize("damage", ["truncate", "flip", "no_checksum", "checksum_a_list", "checksum_not_json"])
def test_damaged_newest_checkpoint_falls_back_to_previous(tmp_path, damage):
    save_state(tmp_path, 1, {"step": 1, "w": torch.ones(1000)})
    newest = save_state(tmp_path, 2, {"step": 2, "w": torch.zeros(1000)})
    data = newest.read_bytes()
    if damage == "truncate":
        newest.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        newest.write_bytes(data[:-100] + bytes([data[-100] ^ 0xFF]) + data[-99:])
    elif damage == "checksum_a_list":
        newest.with_suffix(".json").write_text("[]")
    elif damage == "checksum_not_json":
        newest.with_suffix(".json").write_text("{")
    else:
        newest.with_suffix(".json").unlink()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded, path = load_latest_state(tmp_path)
    assert loaded["step"] == 1 and path.name == "state-000000001.pt"
    assert any("skipping checkpoint" in str(w.message) for w in caught)


def test_keeps_only_the_newest_checkpoints(tmp_path):
    for step in range(5):
        save_state(tmp_path, step, {"step": step}, keep=2)
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["state-000000003.pt", "state-000000004.pt"]


def _start_worker(cwd: Path, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(RUN_PY), *TINY, *overrides],
        cwd=cwd,
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait_for_mid_epoch_state(state_dir: Path, proc: subprocess.Popen, epoch: int, timeout: float = 300) -> int:
    """Poll until a checkpoint of `epoch` a few steps into the epoch exists; returns its batch count."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        names = sorted(state_dir.glob("state-*.json")) if state_dir.is_dir() else []
        if names:
            batches = int(names[-1].stem.split("-")[1])
            if batches // STEPS == epoch and 3 <= batches % STEPS <= STEPS - 6:
                return batches
        time.sleep(0.005)
    raise AssertionError("no mid-epoch checkpoint appeared")


def _final(cwd: Path):
    job_dir = cwd / "runs" / "digits" / "jobs" / JOB
    best = torch.load(job_dir / "best.pt", weights_only=True)
    oof = np.load(job_dir / "oof.npz")
    history = json.loads((job_dir / "metrics.json").read_text())
    return best, oof, history


@pytest.mark.slow
def test_sigkilled_job_resumes_bit_identical(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    straight.mkdir(), killed.mkdir()
    # the reference run saves no mid-epoch state: resuming must not depend on how often state was saved
    proc = run_cmd([sys.executable, str(RUN_PY), *TINY], straight, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    worker = _start_worker(killed, "scheduler.checkpoint_every_s=0")
    _wait_for_mid_epoch_state(killed / "runs" / "digits" / "jobs" / JOB / "state", worker, epoch=1)
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    time.sleep(1.6)  # let the dead worker's lease expire
    resumed = run_cmd([sys.executable, str(RUN_PY), *TINY, "scheduler.checkpoint_every_s=0"], killed, timeout=600)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    line = next(l for l in resumed.stdout.splitlines() if "resumed from" in l)
    assert "(epoch 1, step " in line and "(epoch 1, step 0/" not in line, line

    (a_best, a_oof, a_hist), (b_best, b_oof, b_hist) = _final(straight), _final(killed)
    assert a_best["epoch"] == b_best["epoch"]
    for k, v in a_best["model"].items():
        assert torch.equal(v, b_best["model"][k]), k
    assert list(a_oof["sample_ids"]) == list(b_oof["sample_ids"])
    assert np.array_equal(a_oof["probs"], b_oof["probs"])
    assert [h["val_accuracy"] for h in a_hist] == [h["val_accuracy"] for h in b_hist]
    assert [h["val_ema_accuracy"] for h in a_hist] == [h["val_ema_accuracy"] for h in b_hist]
    assert [h["train_loss"] for h in a_hist] == [h["train_loss"] for h in b_hist]
    attempts = Ledger(killed / "runs" / "digits").attempts(JOB)
    assert [(a.end or {}).get("status") for a in attempts] == ["expired", "done"]


def test_an_owner_frozen_between_its_fence_and_its_write_takes_back_what_it_wrote(tmp_path):
    """The fence passes, the process is frozen past its lease, the new owner finishes the job and removes the state
    directory; on waking the write lands, the second fence raises: nothing of it may stay."""
    from distrain.errors import LeaseLost

    calls = []

    def fence():
        calls.append(1)
        if len(calls) == 2:
            raise LeaseLost("job taken over")

    state_dir = tmp_path / "state"
    with pytest.raises(LeaseLost):
        save_state(state_dir, 7, {"w": torch.ones(3)}, fence=fence)
    assert not state_dir.exists()  # it made the directory, so it takes it back too
    kept = save_state(state_dir, 1, {"w": torch.zeros(3)})  # the new owner's checkpoint
    calls.clear()
    with pytest.raises(LeaseLost):
        save_state(state_dir, 7, {"w": torch.ones(3)}, fence=fence)
    assert sorted(p.name for p in state_dir.iterdir()) == sorted([kept.name, kept.with_suffix(".json").name])
