"""The rendered Kubernetes manifests, run as written on this machine: each "pod" is a local process running its
container's command, args and env (`$(VAR)` expanded as the kubelet does, Secrets and the Job controller's
JOB_COMPLETION_INDEX filled in), in a mount and UTS namespace of its own where its volumes are bind-mounted at
their mountPaths, its hostname is the pod's name and /etc/hosts maps the Services' names to loopback.
PostgreSQL is Debian's, started with the StatefulSet's user, database and password. Needs root (mounts).

Shown: the indexed Job's two pods train the study, aggregate once, and MLflow (behind --allowed-hosts, its
readiness probe sent with the Service's Host header) receives every job run with nothing left offline; a pod
sent SIGTERM mid-job exits 75 and a pod with a bad config exits 2, which the Job's podFailurePolicy maps to
Ignore and FailJob; the same probe against an MLflow server started without --allowed-hosts gets a 403."""

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from distrain.orchestration.ledger import Ledger, aggregate_id

from conftest import REPO, child_env, e2e_timeout, free_port, postgres_server, run_cmd

pytestmark = pytest.mark.slow

TINY = ["model.names=[test_resnet]", "data.image_size=16", "cv.folds=2", "cv.seeds=[1,2]", "train.epochs=1",
        "train.progress=false", "ensemble.selection_rounds=5"]  # fmt: skip
SECRETS = {"distrain-mlflow-db": {"password": "not-a-real-secret"}}
HOSTS = {"distrain-mlflow": "127.0.0.1", "distrain-postgres": "127.0.0.2"}  # the Services' names


def can_namespace() -> bool:
    if os.geteuid() != 0 or not shutil.which("unshare"):
        return False
    return subprocess.run(["unshare", "--mount", "--uts", "true"], capture_output=True).returncode == 0


def container_env(container: dict, pod_name: str, extra: dict) -> dict:
    """The container's environment as the kubelet builds it: controller-injected vars, then `env` in order."""
    env = {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "HOSTNAME": pod_name, **extra}
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = expand(e["value"], env)
        elif "secretKeyRef" in e["valueFrom"]:
            ref = e["valueFrom"]["secretKeyRef"]
            env[e["name"]] = SECRETS[ref["name"]][ref["key"]]
        elif e["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name":
            env[e["name"]] = pod_name
    return env


def expand(text: str, env: dict) -> str:
    """Kubernetes' `$(VAR)` expansion in command, args and env values."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), text)


class Node:
    """This machine as a node: volumes as folders, the Services' names in a hosts file."""

    def __init__(self, root: Path):
        self.root = root
        self.hosts = root / "hosts"
        self.hosts.write_text("127.0.0.1 localhost\n" + "".join(f"{ip} {name}\n" for name, ip in HOSTS.items()))
        self.made_mount_points: list[Path] = []

    def start(self, pod: dict, pod_name: str, volumes: dict[str, Path], extra_env: dict | None = None, log=None):
        """Start the pod's one container with `volumes` (volume name -> folder) mounted at their mountPaths."""
        (container,) = pod["containers"]
        env = container_env(container, pod_name, extra_env or {})
        binds = []
        for m in container.get("volumeMounts", []):
            if m["name"] in volumes:
                target = Path(m["mountPath"])
                if not target.exists():
                    target.mkdir(parents=True)
                    self.made_mount_points.append(target)
                binds.append(f"mount --bind {shlex.quote(str(volumes[m['name']]))} {shlex.quote(str(target))}")
        script = " && ".join([f"mount --bind {self.hosts} /etc/hosts", *binds, f"hostname {pod_name}", 'exec "$@"'])
        command = [expand(a, env) for a in container["command"] + container.get("args", [])]
        return subprocess.Popen(["unshare", "--mount", "--uts", "--propagation", "private", "sh", "-c", script,
                                 pod_name, *command], env=env, cwd=self.root, stdout=log or subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip

    def cleanup(self) -> None:
        for p in reversed(self.made_mount_points):
            shutil.rmtree(p, ignore_errors=True)


def pod_failure_action(job_spec: dict, exit_code: int) -> str | None:
    """What the Job controller does with a pod that exited with `exit_code` (the first matching rule)."""
    for rule in job_spec["podFailurePolicy"]["rules"]:
        on = rule.get("onExitCodes")
        if on and (exit_code in on["values"]) == (on["operator"] == "In"):
            return rule["action"]
    return None if exit_code == 0 else "Count"


def probe(c: dict, host_ip: str) -> int:
    """The container's readinessProbe, sent as the kubelet sends it, to `host_ip`; the HTTP status."""
    get = c["readinessProbe"]["httpGet"]
    req = urllib.request.Request(f"http://{host_ip}:{get['port']}{get['path']}",
                                 headers={h["name"]: h["value"] for h in get.get("httpHeaders", [])})  # fmt: skip
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def wait_ready(c: dict, proc: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        assert proc.poll() is None, f"the MLflow pod exited {proc.returncode}"
        try:
            if probe(c, HOSTS["distrain-mlflow"]) == 200:
                return
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail("the MLflow pod never became ready")


def load(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Render for 2 indexed worker pods, start PostgreSQL and the MLflow pod, run both worker pods to the end.
    Yields (node, the Job, worker exit codes, volumes, MLflow container, pods' output)."""
    if not can_namespace():
        pytest.skip("needs root and mount / UTS namespaces (unshare) to mount the pods' volumes")
    root = tmp_path_factory.mktemp("k8s")
    out = root / "rendered"
    config = str(REPO / "configs" / "digits.yaml")
    rendered = run_cmd([sys.executable, "-m", "distrain.cli", "k8s", "render", "--config", config, "--workers", "2",
                        "--out", str(out), *TINY], root)  # fmt: skip
    assert rendered.returncode == 0, rendered.stderr
    (job,) = load(out / "overlays" / "digits" / "workers.yaml")
    deployment = next(o for o in load(out / "base" / "mlflow.yaml") if o["kind"] == "Deployment")
    statefulset = load(out / "base" / "postgres.yaml")[0]
    pg_env = container_env(statefulset["spec"]["template"]["spec"]["containers"][0], "distrain-postgres-0", {})
    volumes = {name: root / name for name in ("runs", "config", "artifacts")}  # emptyDirs: the host's folders
    for folder in volumes.values():
        folder.mkdir()
    shutil.copy(out / "overlays" / "digits" / "config.yaml", volumes["config"] / "config.yaml")  # the ConfigMap
    node = Node(root)
    with postgres_server(HOSTS["distrain-postgres"], 5432) as admin_url:
        import psycopg

        with psycopg.connect(admin_url, autocommit=True) as db:  # what the postgres image does with its env
            db.execute(f"CREATE ROLE {pg_env['POSTGRES_USER']} LOGIN PASSWORD '{pg_env['POSTGRES_PASSWORD']}'")
            db.execute(f"CREATE DATABASE {pg_env['POSTGRES_DB']} OWNER {pg_env['POSTGRES_USER']}")
        pod = deployment["spec"]["template"]["spec"]
        mlflow_log = (root / "mlflow.log").open("w")
        server = node.start(pod, "distrain-mlflow-0", volumes, log=mlflow_log)
        try:
            wait_ready(pod["containers"][0], server)
            workers = [node.start(job["spec"]["template"]["spec"], f"distrain-digits-{i}-x", volumes,
                                  {"JOB_COMPLETION_INDEX": str(i)}) for i in range(2)]  # fmt: skip
            outputs = [w.communicate(timeout=e2e_timeout(600))[0] for w in workers]
            yield node, job, [w.returncode for w in workers], volumes, pod["containers"][0], outputs
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=30)
            node.cleanup()


def test_two_indexed_pods_train_the_study_aggregate_once_and_log_everything_to_mlflow(cluster):
    node, job, codes, volumes, mlflow_container, outputs = cluster
    assert codes == [0, 0], "\n".join(o[-3000:] for o in outputs)
    run_dir = volumes["runs"] / "digits"
    report = json.loads((run_dir / "report.json").read_text())
    ids = sorted(j["id"] for j in report["jobs"])
    assert ids == [f"test_resnet-s{s}-f{f}" for s in (1, 2) for f in (0, 1)]
    ledger = Ledger(run_dir)
    assert [(a.end or {}).get("status") for a in ledger.attempts(aggregate_id(ids))] == ["done"]
    assert not any((run_dir / "tracking-buffer").glob("*")) if (run_dir / "tracking-buffer").exists() else True
    assert report["mlflow"]["tracking_uri"] == "http://distrain-mlflow:5000"  # the Service, not a fallback
    client = MlflowClient(f"http://127.0.0.1:{mlflow_container['ports'][0]['containerPort']}")
    runs = client.search_runs([report["mlflow"]["experiment_id"]])
    jobs = sorted(r.info.run_name for r in runs if r.data.tags.get("distrain.kind") == "job")
    assert jobs == ids and all(r.info.status != "RUNNING" for r in runs)
    assert client.get_model_version(report["ensemble_model"]["name"], report["ensemble_model"]["version"])
    log = "\n".join(outputs)
    assert "Invalid Host header" not in log and not re.search(r"\b403\b", log) and "offline" not in log.lower()


def test_a_pod_sent_sigterm_exits_75_and_a_bad_config_exits_2_as_the_failure_policy_expects(cluster, tmp_path):
    node, job, _, volumes, *_ = cluster
    pod = job["spec"]["template"]["spec"]
    config = yaml.safe_load((volumes["config"] / "config.yaml").read_text())
    long = tmp_path / "long"
    long.mkdir()
    (long / "config.yaml").write_text(yaml.safe_dump({**config, "experiment": "long", "train": {**config["train"],
                                                      "epochs": 40}}))  # fmt: skip
    log = tmp_path / "long.log"
    with log.open("w") as f:
        proc = node.start(pod, "distrain-long-0-x", {**volumes, "config": long}, {"JOB_COMPLETION_INDEX": "0"}, log=f)
    deadline = time.time() + e2e_timeout(300)
    while " claimed " not in log.read_text() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
    time.sleep(3)  # into the first epoch
    os.killpg(proc.pid, signal.SIGTERM)  # what the kubelet does, to the container's whole process tree here
    sent = time.time()
    proc.wait(timeout=60)
    output = log.read_text()
    assert proc.returncode == 75, output[-3000:]
    assert time.time() - sent < 30
    assert pod_failure_action(job["spec"], proc.returncode) == "Ignore"

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.yaml").write_text(yaml.safe_dump({**config, "cv": {**config["cv"], "folds": 1}}))
    proc = node.start(pod, "distrain-bad-0-x", {**volumes, "config": bad}, {"JOB_COMPLETION_INDEX": "0"})
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 2 and "cv.folds" in output.strip().splitlines()[-1], output[-2000:]
    assert pod_failure_action(job["spec"], proc.returncode) == "FailJob"
    assert pod_failure_action(job["spec"], 3) == "FailIndex" and pod_failure_action(job["spec"], 1) == "Count"


def test_the_readiness_probe_fails_on_a_server_without_allowed_hosts(cluster, tmp_path):
    """The manifests before `render` ran `mlflow server` without --allowed-hosts: /health answered 200, so the
    pod was ready, but every request under the Service's name got 403. The rendered probe sees the 403."""
    *_, mlflow_container, _ = cluster
    port = free_port()
    command = [sys.executable, "-m", "mlflow", "server", "--host", "0.0.0.0", "--port", str(port),
               "--backend-store-uri", f"sqlite:///{tmp_path}/m.db", "--workers", "1"]  # fmt: skip
    server = subprocess.Popen(command, cwd=tmp_path, env=child_env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                assert time.time() < deadline and server.poll() is None
                time.sleep(0.3)
        get = {**mlflow_container["readinessProbe"]["httpGet"], "port": port}
        as_written = {**mlflow_container, "readinessProbe": {"httpGet": get}}
        assert probe(as_written, "127.0.0.1") == 403
        bare = {"readinessProbe": {"httpGet": {"path": "/health", "port": port}}}  # the old probe: ready anyway
        assert probe(bare, "127.0.0.1") == 200
    finally:
        server.terminate()
        server.wait(timeout=30)
