"""Shared helpers: run distrain's commands as users do (subprocesses in a scratch directory).

Tests mirror the packages (tests/study, tests/data, ...); end-to-end runs of the main job are marked
`slow` (tests/e2e and a few in the package folders), so `pytest -m "not slow"` is the quick loop.
Scripts that tests launch under accelerate / torchrun / deepspeed live in tests/scripts."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from distrain.orchestration.local import free_port

REPO = Path(__file__).resolve().parents[1]
RUN_PY = REPO / "distrain" / "run.py"


def e2e_timeout(base_s: float) -> int:
    """A bound for an end-to-end subprocess: `base_s` (what a 2-core machine needs, with room) times
    $DISTRAIN_TEST_TIME_SCALE (default 1) for slower machines, so a slow machine fails by its own
    measure instead of turning one time-out into a dozen errors."""
    return int(base_s * float(os.environ.get("DISTRAIN_TEST_TIME_SCALE", "1")))


def child_env(env: dict | None = None) -> dict:
    """The test interpreter's environment for a command, without MLFLOW_TRACKING_URI (tests use their own stores;
    `mlflow.set_tracking_uri` in an earlier test sets it in this process)."""
    full_env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    full_env.update({"PYTHONWARNINGS": "ignore", **(env or {})})
    return full_env


def run_cmd(args: list[str], cwd: Path, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a command with the test interpreter's environment (`child_env`); output captured as text."""
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=child_env(env))


def distrain_cli(capsys, *argv: str) -> subprocess.CompletedProcess:
    """`distrain <argv>` through the console script's own `main`, in this process: the same code path without an
    interpreter start (a few seconds of imports per command). Output captured with pytest's `capsys`."""
    from distrain import cli

    capsys.readouterr()
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(["distrain", *argv], code, out, err)


def cli_in(capsys, monkeypatch, cwd: Path, *argv: str) -> subprocess.CompletedProcess:
    """`distrain_cli` run from `cwd` (the working directory is restored after the test)."""
    monkeypatch.chdir(cwd)
    return distrain_cli(capsys, *argv)


def run_in(capsys, monkeypatch, cwd: Path, *argv: str) -> subprocess.CompletedProcess:
    """`distrain/run.py <argv>` through its `main`, in this process, from `cwd`: for refusals and runs whose work
    is already done (a subprocess costs ~5 s of imports). Use with the `fresh_accelerate_state` fixture."""
    from distrain import run

    monkeypatch.chdir(cwd)
    capsys.readouterr()
    code = run.main(list(argv))
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(["run.py", *argv], code, out, err)


def in_process(cwd: Path, *argv: str, entry: str = "cli") -> subprocess.CompletedProcess:
    """`distrain <argv>` (entry "cli") or `distrain/run.py <argv>` (entry "run") in this process from `cwd`, with a
    fresh accelerate state and the output captured: what a module-scoped fixture (no capsys, no monkeypatch) uses
    instead of a subprocess and its ~5 s of imports."""
    import contextlib
    import io

    from accelerate.state import AcceleratorState, GradientState

    from distrain import cli, run

    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        mp.chdir(cwd)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)  # as `child_env`: an earlier test's store is not this run's
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        try:
            code = (cli.main if entry == "cli" else run.main)(list(argv))
        finally:
            AcceleratorState._reset_state(True)
            GradientState._reset_state()
    return subprocess.CompletedProcess([entry, *argv], code, out.getvalue(), err.getvalue())


def accelerate_launch(processes: int, script: Path) -> list[str]:
    """`accelerate launch --multi_gpu` of `script` with `processes` processes: real DDP over gloo on CPU."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(free_port()), str(script)]  # fmt: skip


def distrain_run(
    cwd: Path,
    *overrides: str,
    config: Path = REPO / "configs" / "digits.yaml",
    processes: int = 1,
    timeout: int = 600,
    env: dict | None = None,
) -> subprocess.CompletedProcess:
    """The main job, as `python distrain/run.py` (1 process) or `accelerate launch --multi_gpu` (DDP on CPU)."""
    cmd = [sys.executable, str(RUN_PY)] if processes == 1 else accelerate_launch(processes, RUN_PY)
    return run_cmd(cmd + ["--config", str(config), *overrides], cwd, timeout, env)


def in_process_steps(cwd: Path, steps: list[tuple[str, ...]]) -> subprocess.CompletedProcess:
    """`in_process` of each (entry, *argv) in turn, each asserted to succeed; returns the last one's result."""
    for entry, *argv in steps:
        proc = in_process(cwd, *argv, entry=entry)
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def distrain_run_here(cwd: Path, *overrides: str, config: Path = REPO / "configs" / "digits.yaml"):
    """`distrain_run` of one process, in this process (`in_process`): for studies whose test needs no process of
    their own (no signal, no kill, no timing)."""
    return in_process(cwd, "--config", str(config), *overrides, entry="run")


def ledger_history(ledger, job_ids: list[str]) -> list[dict]:
    """Every attempt of the given jobs as {job, attempt, worker, start, end, status}, by start time.
    `end` is the owner's last sign of life (its end, else its last heartbeat)."""
    rows = [{"job": j, "attempt": a.number, "worker": a.worker, "start": a.claimed_at, "end": a.last_seen,
             "status": (a.end or {}).get("status", "open")} for j in job_ids for a in ledger.attempts(j)]  # fmt: skip
    return sorted(rows, key=lambda r: r["start"])


def holdout_images(cwd: Path):
    """The holdout images of `<cwd>/data/digits`, raw from the shards, in sample-id order: (ids, uint8 array)."""
    import io
    import json

    import numpy as np
    import webdataset as wds
    from PIL import Image

    index = json.loads((cwd / "data" / "digits" / "index.json").read_text())
    urls = [str(cwd / "data" / "digits" / s) for s in index["shards"]["test"]]
    rows = sorted(
        (s["__key__"], np.asarray(Image.open(io.BytesIO(s["png"]))))
        for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False)
    )
    return [r[0] for r in rows], np.stack([r[1] for r in rows])


def last_line(text: str) -> str:
    lines = [l for l in text.strip().splitlines() if l.strip()]
    return lines[-1] if lines else ""


def pytest_configure(config):
    """Under pytest-xdist (`-n N`), give each worker its own share of the CPUs: the processes a test starts
    inherit the affinity, so distrain sizes its threads to that share (`distributed.cpus`) instead of every
    worker running as many threads as the machine has cores. Unpinned, the suite took longer on 2 workers than
    serially: the end-to-end tests are CPU-bound, and oversubscribed torch threads spin."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER"), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if worker is None or count < 2 or not hasattr(os, "sched_setaffinity"):
        return
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) >= count:
        os.sched_setaffinity(0, cpus[int(worker.removeprefix("gw")) % count :: count])
        torch.set_num_threads(len(os.sched_getaffinity(0)))


def pytest_collection_modifyitems(config, items):
    """Modules with end-to-end (`slow`) tests first, in their own order, then the rest: under `--dist loadfile`
    each worker takes the next module when it is free, and each is pinned to its own CPU, so a long module taken
    last would leave the other CPU idle for its whole length."""
    heavy = {item.module.__name__ for item in items if item.get_closest_marker("slow")}
    order = {id(item): i for i, item in enumerate(items)}
    items.sort(key=lambda item: (item.module.__name__ not in heavy, order[id(item)]))


requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@contextlib.contextmanager
def mlflow_server(store_uri: str, cwd: Path, port: int | None = None):
    """A real `mlflow server` on loopback (serving artifacts under cwd/mlartifacts); stopped afterwards.
    Yields its URL."""
    import urllib.request

    port = port or free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            store_uri,
            "--artifacts-destination",
            str(cwd / "mlartifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    with _serving(proc, lambda: urllib.request.urlopen(url + "/health", timeout=2), OSError, "mlflow server", 120):
        yield url


@contextlib.contextmanager
def postgres_server(host: str = "127.0.0.1", port: int | None = None, password: str | None = None):
    """A real PostgreSQL server (Debian's packages) on loopback, in a scratch data directory; stopped and removed
    afterwards. Trust auth, or with `password` the user postgres's password (scram-sha-256), which the yielded
    URL does not hold (clients pass it as PGPASSWORD). Skips the test where PostgreSQL is not installed."""
    import glob
    import shutil
    import tempfile

    found = shutil.which("initdb") or max(glob.glob("/usr/lib/postgresql/*/bin/initdb"), default=None)
    if found is None:
        pytest.skip("PostgreSQL is not installed (Debian: apt-get install postgresql; .ci/run does)")
    bindir = Path(os.path.realpath(found)).parent
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []  # postgres refuses root
    data = Path(tempfile.mkdtemp(prefix="distrain-pg-"))
    if as_postgres:
        shutil.chown(data, "postgres", "postgres")
    auth = ["--auth=trust"]
    if password is not None:
        (data / "pw").write_text(password)
        auth = ["--auth=scram-sha-256", f"--pwfile={data / 'pw'}"]
    subprocess.run([*as_postgres, str(bindir / "initdb"), "-D", str(data / "db"), "-U", "postgres", *auth,
                    "-E", "UTF8"], check=True, capture_output=True)  # fmt: skip
    port = port or free_port()
    proc = subprocess.Popen([*as_postgres, str(bindir / "postgres"), "-D", str(data / "db"), "-p", str(port),
                             "-k", str(data), "-c", f"listen_addresses={host}", "-c", "fsync=off"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    url = f"postgresql://postgres@{host}:{port}/postgres"
    import psycopg

    try:
        with _serving(proc, lambda: psycopg.connect(url, password=password).close(), psycopg.OperationalError,
                      "postgres", 60):  # fmt: skip
            yield url
    finally:
        shutil.rmtree(data, ignore_errors=True)


@contextlib.contextmanager
def _serving(proc: subprocess.Popen, probe, not_up: type[Exception], what: str, timeout_s: float):
    """Wait until `probe()` stops raising `not_up` (fail if `proc` exits or `timeout_s` passes), run the body,
    then stop `proc` (SIGTERM, SIGKILL after 30 s)."""
    import time

    try:
        deadline = time.time() + timeout_s
        while True:
            try:
                probe()
                break
            except not_up:
                if time.time() > deadline or proc.poll() is not None:
                    pytest.fail(f"{what} did not start")
                time.sleep(0.3)
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture
def fresh_accelerate_state():
    """Accelerator state is a per-process singleton; reset it around each in-process test."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def digit_pairs(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Pairs of scikit-learn's digits, half of them the same digit: xa, xb [n, 8, 8] uint8, y (1: same digit)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)
    rng = np.random.default_rng(seed)
    a = rng.integers(0, len(images), n)
    same = rng.random(n) < 0.5
    b = np.array([rng.choice(np.flatnonzero((digits.target == digits.target[i]) == s)) for i, s in zip(a, same)])
    return {"xa": images[a], "xb": images[b], "y": (digits.target[a] == digits.target[b]).astype(np.int64)}
