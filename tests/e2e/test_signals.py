"""SIGTERM at every moment of the main command: in its first second (before anything is claimed), mid-epoch
on the default config (the time to exit is what a spot node's 15 s grace allows for), and during the
aggregation. Between jobs is tests/orchestration/test_worker.py; during sync, tests/tracking/test_offline.py."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from distrain import run
from distrain.errors import EXIT_OK, EXIT_PREEMPTED
from distrain.orchestration.ledger import Ledger, aggregate_id
from distrain.training.checkpoint import load_latest_state

from conftest import REPO, RUN_PY, child_env, e2e_timeout

pytestmark = pytest.mark.slow

DEFAULT = REPO / "configs" / "digits.yaml"
SCHEDULE = [sys.executable, "-m", "distrain.cli", "schedule", "--config", str(DEFAULT), "--workers", "1"]


class Command:
    """A command started in its own process group, its output (stdout and stderr) collected as it comes."""

    def __init__(self, argv: list[str], cwd: Path):
        self.proc = subprocess.Popen(argv, cwd=cwd, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, start_new_session=True)  # fmt: skip
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self.reader.start()

    def wait_for(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.lines):
            assert self.proc.poll() is None and time.monotonic() < deadline, "".join(self.lines)[-3000:]
            time.sleep(0.02)

    def terminate(self) -> tuple[int, float]:
        """SIGTERM to the command (its own process: it forwards it); its exit code and seconds to exit."""
        sent = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=60)
        took = time.monotonic() - sent
        self.reader.join(timeout=10)
        return code, took

    @property
    def last_line(self) -> str:
        return [line for line in self.lines if line.strip()][-1].strip()


@pytest.mark.parametrize("argv", [SCHEDULE, [sys.executable, str(RUN_PY), "--config", str(DEFAULT)]],
                         ids=["distrain schedule", "distrain/run.py"])  # fmt: skip
def test_sigterm_in_the_first_second_exits_75_in_one_line_with_nothing_claimed(tmp_path, argv):
    command = Command(argv, tmp_path)
    time.sleep(0.5)
    code, took = command.terminate()
    assert code == EXIT_PREEMPTED, "".join(command.lines)[-3000:]
    assert "stopped by SIGTERM" in command.last_line and "Traceback" not in "".join(command.lines)
    assert not (tmp_path / "runs" / "digits" / "ledger" / "jobs").exists()  # nothing claimed
    print(f"{Path(argv[-3]).name if 'run.py' in argv[1] else 'schedule'}: SIGTERM at 0.5 s -> exit in {took:.2f} s")


def test_sigterm_mid_epoch_on_the_default_config_saves_and_exits_75_within_10_s(tmp_path):
    command = Command(SCHEDULE, tmp_path)
    command.wait_for("claimed", timeout=e2e_timeout(120))
    job = next(line for line in command.lines if "claimed" in line).split("claimed ")[1].split()[0]
    time.sleep(2.5)  # a few optimizer steps into the first epoch
    code, took = command.terminate()
    assert code == EXIT_PREEMPTED, "".join(command.lines)[-3000:]
    assert "stopped by SIGTERM" in command.last_line, command.last_line
    state, _ = load_latest_state(tmp_path / "runs" / "digits" / "jobs" / job / "state")
    (attempt,) = Ledger(tmp_path / "runs" / "digits").attempts(job)
    assert attempt.end["status"] == "preempted"  # released at once: the next worker claims it without waiting
    print(f"default config, SIGTERM mid-job (saved at epoch {state['epoch']} step {state['step']}): exit 75 "
          f"in {took:.2f} s")  # fmt: skip
    assert took < 10


def test_sigterm_to_schedule_with_dataloader_workers_saves_and_the_next_run_resumes(tmp_path):
    """SIGTERM to `distrain schedule` reaches the worker's whole process group, DataLoader workers included (as tini
    forwards it in a pod). Those workers must leave the signal to the trainer: one that died of it failed the job
    ("DataLoader worker ... killed by signal: Terminated") with no state saved, and the next run began at epoch 0."""
    argv = [*SCHEDULE, "data.num_workers=2", "data.image_size=16", "cv.seeds=[1]", "cv.only_folds=[0]",
            "train.epochs=4", "train.progress=true", "ensemble.stacking=false"]  # fmt: skip
    command = Command(argv, tmp_path)
    command.wait_for("epoch 1/4", timeout=e2e_timeout(180))  # mid-epoch 2: the workers are streaming
    time.sleep(0.3)
    code, _ = command.terminate()
    assert code == EXIT_PREEMPTED, "".join(command.lines)[-3000:]
    job = "test_resnet-s1-f0"
    (attempt,) = Ledger(tmp_path / "runs" / "digits").attempts(job)
    assert attempt.end["status"] == "preempted", attempt.end
    state, _ = load_latest_state(tmp_path / "runs" / "digits" / "jobs" / job / "state")
    assert state["epoch"] >= 1, state["epoch"]
    again = Command(argv, tmp_path)
    assert again.proc.wait(timeout=e2e_timeout(300)) == EXIT_OK, "".join(again.lines)[-3000:]
    again.reader.join(timeout=10)
    assert any(f"{job}: resumed from" in line and f"epoch {state['epoch']}" in line for line in again.lines), "".join(
        again.lines
    )[-3000:]


TINY = ["model.names=[test_resnet]", "data.image_size=16", "cv.folds=2", "cv.seeds=[1]", "train.epochs=1",
        "train.progress=false", "ensemble.max_rounds=300", "data.num_workers=0"]  # fmt: skip


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_sigterm_during_the_aggregation_publishes_nothing_and_the_rerun_aggregates_once(tmp_path, monkeypatch, capsys):
    command = Command([sys.executable, str(RUN_PY), *TINY], tmp_path)
    command.wait_for("aggregates (attempt 1)", timeout=e2e_timeout(180))
    code, took = command.terminate()
    assert code == EXIT_PREEMPTED, "".join(command.lines)[-3000:]
    assert "stopped by SIGTERM" in command.last_line, command.last_line
    run_dir = tmp_path / "runs" / "digits"
    assert not (run_dir / "report.json").exists() and not (run_dir / "ensemble").exists()
    monkeypatch.chdir(tmp_path)  # the rerun through the main command's own `main`, in this process
    capsys.readouterr()
    code = run.main(TINY)
    out, err = capsys.readouterr()
    assert code == EXIT_OK, out[-2000:] + err[-2000:]
    assert "claimed test_resnet" not in out  # the jobs stayed done; only the aggregation ran again
    ledger = Ledger(run_dir)
    ends = [a.end["status"] for a in ledger.attempts(aggregate_id(["test_resnet-s1-f0", "test_resnet-s1-f1"]))]
    assert ends == ["preempted", "done"]
    assert json.loads((run_dir / "report.json").read_text())["ensembles"]
    print(f"SIGTERM during the aggregation: exit 75 in {took:.2f} s; the rerun aggregated once")
