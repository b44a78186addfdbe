"""Fault injection for the tests: worker processes to kill, freeze and wake, and a TCP proxy in front of the
tracking server that refuses, resets and stalls connections."""

from __future__ import annotations

import random
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

from conftest import RUN_PY, child_env


class Worker:
    """`python distrain/run.py` with overrides, its output in a log file that tests can wait on."""

    def __init__(self, cwd: Path, overrides: list[str], name: str):
        self.log = cwd / f"{name}.log"
        self._out = open(self.log, "w")
        env = child_env({"DISTRAIN_WORKER_ID": name})
        self.proc = subprocess.Popen(
            [sys.executable, str(RUN_PY), *overrides], cwd=cwd, stdout=self._out, stderr=subprocess.STDOUT, env=env
        )

    def text(self) -> str:
        return self.log.read_text()

    def wait_for(self, needle: str, timeout: float = 120) -> None:
        """Block until `needle` appears in the worker's output (fails if the worker exits first)."""
        deadline = time.monotonic() + timeout
        while needle not in self.text():
            assert self.proc.poll() is None, f"worker exited {self.proc.returncode} before {needle!r}:\n{self.text()}"
            assert time.monotonic() < deadline, f"no {needle!r} after {timeout} s:\n{self.text()}"
            time.sleep(0.05)

    def wait(self, timeout: float = 300) -> int:
        code = self.proc.wait(timeout=timeout)
        self._out.close()
        return code


class FlakyProxy:
    """A TCP proxy on loopback in front of `target_port`. Modes: "down" (every connection reset at once),
    "flaky" (a connection is reset after a random number of bytes, mid-request or mid-upload, with
    probability `reset`, or stalled for a second first with probability `stall`), "up" (plain forwarding)."""

    def __init__(self, target_port: int, mode: str = "up", reset: float = 0.3, stall: float = 0.2, seed: int = 0):
        self.target_port, self.mode, self.reset, self.stall = target_port, mode, reset, stall
        self.rng = random.Random(seed)
        self.resets = self.stalls = self.connections = 0
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self.server.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        self.connections += 1
        if self.mode == "down":
            return _reset(client)
        budget = None
        if self.mode == "flaky" and self.rng.random() < self.reset:
            budget = self.rng.randint(0, 64 * 1024)
            self.resets += 1
        if self.mode == "flaky" and self.rng.random() < self.stall:
            self.stalls += 1
            time.sleep(1.0)
        try:
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
        except OSError:
            return _reset(client)
        done = threading.Event()
        threading.Thread(target=_pump, args=(upstream, client, None, done), daemon=True).start()
        _pump(client, upstream, budget, done)
        if budget is not None:
            _reset(client)
            _reset(upstream)


def _pump(src: socket.socket, dst: socket.socket, budget: int | None, done: threading.Event) -> None:
    """Copy bytes src -> dst until either side closes, or until `budget` bytes went through."""
    sent = 0
    try:
        while not done.is_set():
            data = src.recv(65536)
            if not data:
                break
            if budget is not None and sent + len(data) > budget:
                dst.sendall(data[: budget - sent])
                break
            dst.sendall(data)
            sent += len(data)
    except OSError:
        pass
    finally:
        done.set()
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _reset(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0), as a load balancer or a dying node does."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    except OSError:
        pass


def mlflow_tree(client: MlflowClient, experiment: str) -> dict:
    """What a study left in MLflow: its study runs, job runs by name, ensemble runs, model versions."""
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000) if exp else []
    by_kind: dict[str, list] = {}
    for r in runs:
        by_kind.setdefault(r.data.tags.get("distrain.kind", "?"), []).append(r)
    return {
        "study": by_kind.get("study", []),
        "jobs": sorted(by_kind.get("job", []), key=lambda r: r.info.run_name),
        "ensembles": by_kind.get("ensemble", []),
        "versions": client.search_model_versions(f"name='distrain-{experiment}'"),
    }


def assert_one_run_per_job(client: MlflowClient, experiment: str, job_ids: list[str], epochs: int) -> dict:
    """One FINISHED study run; one FINISHED run per job, each with one val row per epoch; none RUNNING; one
    model version. Returns the tree."""
    tree = mlflow_tree(client, experiment)
    assert [r.info.status for r in tree["study"]] == ["FINISHED"], [r.info.run_id for r in tree["study"]]
    assert [r.info.run_name for r in tree["jobs"]] == sorted(job_ids)
    assert all(r.info.status == "FINISHED" for r in tree["jobs"] + tree["ensembles"]), [
        (r.info.run_name, r.info.status) for r in tree["jobs"] + tree["ensembles"]
    ]
    study_id = tree["study"][0].info.run_id
    assert {r.data.tags["mlflow.parentRunId"] for r in tree["jobs"] + tree["ensembles"]} == {study_id}
    for r in tree["jobs"]:
        steps = sorted(m.step for m in client.get_metric_history(r.info.run_id, "val_accuracy"))
        assert steps == list(range(epochs)), (r.info.run_name, steps)
    assert len(tree["versions"]) == 1, [v.version for v in tree["versions"]]
    return tree
