"""Real workers on one ledger: `distrain schedule` packing W accelerate-launch groups of P gloo
processes, a job that keeps failing, and the status command."""

import json
import sys

import pytest

from distrain.errors import EXIT_FAILED_FOR_GOOD
from distrain.orchestration.ledger import Ledger, aggregate_id

from conftest import REPO, RUN_PY, distrain_cli, ledger_history, run_cmd

pytestmark = pytest.mark.slow

TINY = [
    "model.names=[test_resnet]",
    "data.image_size=16",
    "cv.folds=2",
    "cv.seeds=[1,2]",
    "train.epochs=1",
    "train.progress=false",
    "ensemble.register_model=false",
    "scheduler.poll_s=0.5",
]


def test_schedule_two_workers_of_two_processes_share_the_ledger(tmp_path):
    proc = run_cmd(
        [sys.executable, "-m", "distrain.cli", "schedule", "--workers", "2", "--procs-per-worker", "2", *TINY],
        tmp_path,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dir = tmp_path / "runs" / "digits"
    ledger = Ledger(run_dir)
    ids = [f"test_resnet-s{s}-f{f}" for s in (1, 2) for f in (0, 1)]
    history = ledger_history(ledger, ids + [aggregate_id(ids)])
    assert sorted(r["job"] for r in history if r["status"] == "done") == sorted(ids + [aggregate_id(ids)])
    owners = {r["worker"].rsplit(":", 1)[0] for r in history if r["job"] != aggregate_id(ids)}
    assert len(owners) == 2, owners  # both workers trained jobs
    records = [json.loads(p.read_text()) for p in (run_dir / "ledger" / "workers").glob("*.json")]
    assert len(records) == 2 and sum(r["aggregated"] for r in records) == 1
    report = json.loads((run_dir / "report.json").read_text())
    assert len(report["jobs"]) == 4 and report["failed_jobs"] == []
    assert "worker exit codes [0, 0]" in proc.stdout


def test_failing_job_is_marked_failed_others_finish_report_names_it(tmp_path, capsys, monkeypatch):
    # test_efficientnet at a learning rate of 1e12 diverges in every attempt (NaN loss after 2 steps).
    overrides = [
        "model.names=[test_resnet,test_efficientnet]",
        "model.overrides.test_efficientnet.optim.lr=1e12",
        "model.overrides.test_efficientnet.train.max_nonfinite_losses=2",
        "data.image_size=16",
        "cv.folds=2",
        "cv.seeds=[1]",
        "train.epochs=1",
        "train.progress=false",
        "ensemble.register_model=false",
        "scheduler.max_retries=2",
    ]
    proc = run_cmd([sys.executable, str(RUN_PY), *overrides], tmp_path, timeout=600)
    assert proc.returncode == EXIT_FAILED_FOR_GOOD, proc.stdout[-2000:] + proc.stderr[-2000:]
    run_dir = tmp_path / "runs" / "digits"
    report = json.loads((run_dir / "report.json").read_text())
    assert sorted(f["id"] for f in report["failed_jobs"]) == ["test_efficientnet-s1-f0", "test_efficientnet-s1-f1"]
    assert all("NonFiniteLoss" in f["error"] for f in report["failed_jobs"]), report["failed_jobs"]
    assert sorted(j["id"] for j in report["jobs"]) == ["test_resnet-s1-f0", "test_resnet-s1-f1"]
    assert "FAILED" in proc.stdout

    monkeypatch.chdir(tmp_path)  # the run's config names its data relative to where it ran
    status = distrain_cli(capsys, "status", "--run-dir", str(run_dir), "--json")
    st = json.loads(status.stdout)
    assert st["counts"] == {"pending": 0, "running": 0, "done": 2, "failed": 2}
    vit = next(j for j in st["jobs"] if j["job_id"] == "test_efficientnet-s1-f0")
    assert vit["attempts"] == 2 and vit["errors"] == 2 and vit["last_error"]
    table = distrain_cli(capsys, "status", "--run-dir", str(run_dir))
    assert "failed" in table.stdout and "done 2 failed 2" in table.stdout

    rerun = run_cmd([sys.executable, str(RUN_PY), *overrides], tmp_path, timeout=600)
    assert rerun.returncode == EXIT_FAILED_FOR_GOOD and "claimed" not in rerun.stdout  # no retry past max_retries
    said = "failed for good (retries used up): test_efficientnet-s1-f0 after 2 attempt(s): "
    assert said in rerun.stdout and "distrain retry --run-dir" in rerun.stdout, rerun.stdout[-2000:]  # why exit 3

    again = distrain_cli(capsys, "aggregate", "--run-dir", str(run_dir))
    assert again.returncode == 0, again.stderr
    assert json.loads((run_dir / "report.json").read_text())["failed_jobs"] == report["failed_jobs"]


def test_one_worker_over_two_machines_trains_as_one_ddp_group_and_keeps_exit_codes(tmp_path):
    """What a JobSet's pods run (`--num-machines 2`, the rank from JOB_COMPLETION_INDEX), as two local
    processes meeting on loopback: one DDP group of 2 ranks trains the study, and each "node" reports the
    worker's own exit code (its local rank 0 writes it: accelerate would turn a failure into 1)."""
    import subprocess

    from conftest import child_env, free_port

    port = str(free_port())

    def node(rank: int, *overrides: str) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "distrain.cli", "schedule", "--num-machines", "2", "--main-process-ip",
               "127.0.0.1", "--main-process-port", port, *TINY, *overrides]  # fmt: skip
        return subprocess.Popen(cmd, cwd=tmp_path, env=child_env({"JOB_COMPLETION_INDEX": str(rank)}),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip

    nodes = [node(0), node(1)]
    outputs = [p.communicate(timeout=900)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "2 process(es)" in outputs[0]  # one group of two ranks, not two workers
    run_dir = tmp_path / "runs" / "digits"
    history = ledger_history(Ledger(run_dir), [f"test_resnet-s{s}-f{f}" for s in (1, 2) for f in (0, 1)])
    assert len(history) == 4 and len({r["worker"] for r in history}) == 1  # one worker trained every job
    assert all("worker exit codes [0]" in out for out in outputs)


def test_schedule_ends_with_the_workers_one_line_error_below_the_launchers_traceback(monkeypatch, capfd):
    """Workers that refused bad input (exit 2, their line in the result file) under launchers that printed a
    traceback and exited 1: `distrain schedule` exits 2 and its last line is the workers' error, once."""
    from distrain.orchestration import local

    worker = (
        "import json, os, sys\n"
        "line = 'distrain: error: data/x/cv-000000.tar: not a readable tar shard (OSError: truncated)'\n"
        "print(line, file=sys.stderr)\n"
        "json.dump({'exit_code': 2, 'message': line}, open(os.environ['DISTRAIN_WORKER_RESULT'], 'w'))\n"
        "print('Traceback (most recent call last):\\nsubprocess.CalledProcessError: ...', file=sys.stderr)\n"
        "sys.exit(1)\n"
    )
    monkeypatch.setattr(local, "worker_commands", lambda *a, **k: [([sys.executable, "-c", worker], {})] * 2)
    assert local.run_local_workers(2, 1, []) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert err[-1] == "distrain: error: data/x/cv-000000.tar: not a readable tar shard (OSError: truncated)"
    assert err[-2].startswith("subprocess.CalledProcessError")  # the workers' launchers above it


def test_ranks_get_the_pods_grace_period_to_save_before_the_elastic_agent_kills_them():
    """Under `accelerate launch --multi_gpu`, torch's elastic agent SIGKILLs the ranks 30 s after its own SIGTERM
    unless told otherwise: every worker is told the grace period less 20 s, and the pods allow the full period."""
    from distrain.config import load_config
    from distrain.deploy.k8s import RenderOptions, manifests
    from distrain.orchestration.local import GRACE_PERIOD_S, worker_commands

    commands = worker_commands(2, 2, [], gpus=[], cpu_count=4)
    assert [env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] for _, env in commands] == [str(GRACE_PERIOD_S - 20)] * 2
    rendered = manifests(load_config(REPO / "configs" / "digits.yaml"), RenderOptions(workers=1))
    assert f"terminationGracePeriodSeconds: {GRACE_PERIOD_S}" in rendered["overlays/digits/workers.yaml"]
