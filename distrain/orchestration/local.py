"""`distrain schedule`: pack W workers (process groups) onto this node, all claiming from one ledger.

Worker i is `accelerate launch` with P processes on its own GPU subset (CUDA_VISIBLE_DEVICES) and its
own rendezvous port; on CPU it is P gloo processes with cores / (W x P) threads each. SIGTERM to
this command goes to every worker's whole process group (accelerate's single-process launcher does
not forward it), each saves at its next step boundary, and this command exits 75 once all have
stopped. Exit code: 75 if any worker was preempted, else the worst worker code (0 / 1 / 2).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from distrain import interrupts
from distrain.distributed.cpus import available_cpus
from distrain.errors import EXIT_PREEMPTED, BadInput, NoGPU

RUN_PY = Path(__file__).resolve().parents[1] / "run.py"
GRACE_PERIOD_S = 120
"""How long a preempted worker may take to save and exit (the worker pods' terminationGracePeriodSeconds)."""
RANK_SHUTDOWN_S = GRACE_PERIOD_S - 20
"""How long torch's elastic agent (under `accelerate launch --multi_gpu`) lets ranks save after a SIGTERM before it
SIGKILLs them (TORCH_ELASTIC_SHUTDOWN_TIMEOUT; its default, 30 s, is shorter than a checkpoint of a large model)."""


def free_port() -> int:
    """A TCP port free on loopback right now (for a rendezvous or a test server)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class Nodes:
    """One worker's process group spread over `count` nodes (pods): this node's rank and the rendezvous
    address of rank 0's node (a JobSet's headless Service name)."""

    count: int = 1
    rank: int = 0
    main_ip: str = ""
    main_port: int = 29500

    def check(self, workers: int) -> None:
        if self.count < 1 or not 0 <= self.rank < self.count:
            raise BadInput(f"--num-machines {self.count} / --machine-rank {self.rank}: need 0 <= rank < machines")
        if self.count > 1 and (workers != 1 or not self.main_ip):
            raise BadInput("--num-machines > 1: one worker (--workers 1) and --main-process-ip of machine 0's host")


def worker_commands(
    workers: int, procs_per_worker: int, run_args: list[str], *, gpus: list[str], cpu_count: int, nodes: Nodes = Nodes()
) -> list[tuple[list[str], dict[str, str]]]:
    """(command, extra environment) of each worker. Raises BadInput when GPUs do not divide."""
    if workers < 1 or procs_per_worker < 1:
        raise BadInput(f"--workers and --procs-per-worker must be >= 1, got {workers} and {procs_per_worker}")
    if gpus and workers * procs_per_worker > len(gpus):
        raise BadInput(
            f"--workers {workers} x --procs-per-worker {procs_per_worker} needs "
            f"{workers * procs_per_worker} GPUs; {len(gpus)} visible"
        )
    nodes.check(workers)
    out = []
    host = socket.gethostname()
    for i in range(workers):
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", str(nodes.count),
               "--num_processes", str(procs_per_worker * nodes.count), "--dynamo_backend", "no",
               "--mixed_precision", "no"]  # fmt: skip
        if nodes.count > 1:  # one DDP group over the nodes: the same worker id on each, rank 0's node leads
            cmd += ["--multi_gpu", "--machine_rank", str(nodes.rank), "--main_process_ip", nodes.main_ip,
                    "--main_process_port", str(nodes.main_port)]  # fmt: skip
        elif procs_per_worker > 1:
            cmd += ["--multi_gpu", "--main_process_port", str(free_port())]
        args = list(run_args)
        env = {"DISTRAIN_WORKER_ID": f"{nodes.main_ip}-w{i}" if nodes.count > 1 else f"{host}-w{i}",
               "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": str(RANK_SHUTDOWN_S)}  # fmt: skip
        if nodes.count > 1:
            env["JOB_COMPLETION_INDEX"] = ""  # a JobSet pod's index is its machine rank, not a static shard
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus[i * procs_per_worker : (i + 1) * procs_per_worker])
        elif not any(a.startswith("train.cpu_threads=") for a in args):
            args.append(f"train.cpu_threads={max(1, cpu_count // (workers * procs_per_worker))}")
        out.append((cmd + [str(RUN_PY)] + args, env))
    return out


def visible_gpus() -> list[str]:
    import torch

    if not torch.cuda.is_available():
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return [g for g in visible.split(",") if g] if visible else [str(i) for i in range(torch.cuda.device_count())]


def check_gpus(workers: int, gpus_per_worker: int) -> None:
    """NoGPU (exit 4) when fewer CUDA GPUs are visible than `--gpus-per-worker` asks for on this node."""
    import torch

    visible = visible_gpus()
    if len(visible) < workers * gpus_per_worker:
        cuda = f"torch {torch.__version__} built for CUDA {torch.version.cuda}"
        raise NoGPU(
            f"--gpus-per-worker {gpus_per_worker} x --workers {workers}: {len(visible)} CUDA GPU(s) visible "
            f"({cuda}, torch.cuda.is_available() {torch.cuda.is_available()}); the node, its driver or the image "
            f"is wrong, and training on CPU would hold the GPUs idle"
        )


def run_local_workers(workers: int, procs_per_worker: int, run_args: list[str], nodes: Nodes = Nodes()) -> int:
    """Start the workers, forward SIGTERM / SIGINT to them, wait for all; returns the exit code."""
    commands = worker_commands(workers, procs_per_worker, run_args, gpus=visible_gpus(), cpu_count=available_cpus(),
                               nodes=nodes)  # fmt: skip
    result_dir = Path(tempfile.mkdtemp(prefix="distrain-workers-"))
    procs: list[tuple[subprocess.Popen, Path]] = []
    stopping = {"signal": None}

    def forward(signum, frame):
        stopping["signal"] = signum
        for proc, _ in procs:
            try:
                os.killpg(proc.pid, signal.SIGTERM)  # the launcher and every rank of the worker
            except ProcessLookupError:
                pass

    # Forwarding is in place before the first worker starts, so a signal can never leave one running alone.
    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    if interrupts.stop_requested():  # SIGTERM came before forwarding was in place
        stopping["signal"] = signal.SIGTERM
    for i, (cmd, env) in enumerate(commands):
        if stopping["signal"] is not None:
            break
        result = result_dir / f"w{i}.json"
        worker_env = {**os.environ, **env, "DISTRAIN_WORKER_RESULT": str(result)}
        procs.append((subprocess.Popen(cmd, env=worker_env, start_new_session=True), result))
    if stopping["signal"] is not None:  # it came while a worker was being started: that one is told too
        forward(stopping["signal"], None)
    try:
        for proc, _ in procs:
            proc.wait()
        for proc, _ in procs:  # a launcher killed by the signal leaves its ranks still saving: wait for them
            while _group_alive(proc.pid):
                time.sleep(0.1)
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    codes, messages = [], []
    for proc, result in procs:
        if result.is_file():
            outcome = json.loads(result.read_text())
            codes.append(outcome["exit_code"])
            messages += [outcome["message"]] if outcome.get("message") not in (None, *messages) else []
        else:
            codes.append(proc.returncode if proc.returncode and proc.returncode > 0 else 1)
    print(f"distrain schedule: worker exit codes {codes}", flush=True)
    for message in messages:  # the workers' one-line errors last, below whatever their launchers printed
        print(message, file=sys.stderr, flush=True)
    if EXIT_PREEMPTED in codes or stopping["signal"] is not None:
        name = signal.Signals(stopping["signal"] or signal.SIGTERM).name
        done = "the workers saved their state and released their jobs" if procs else "before any worker started"
        print(f"distrain schedule: stopped by {name}; {done} (exit {EXIT_PREEMPTED})", flush=True)
        return EXIT_PREEMPTED
    return max(codes)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
