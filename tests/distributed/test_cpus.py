"""Thread and worker counts follow the CPUs this process may use, not the machine's core count."""

import os

from distrain.distributed import cpus


def test_cgroup_quota_is_read_from_v2_then_v1(tmp_path):
    v2 = tmp_path / "cpu.max"
    v2.write_text("150000 100000\n")
    assert cpus.cgroup_cpu_limit(v2, tmp_path / "none", tmp_path / "none") == 1.5
    v2.write_text("max 100000\n")
    assert cpus.cgroup_cpu_limit(v2, tmp_path / "none", tmp_path / "none") is None
    quota, period = tmp_path / "quota", tmp_path / "period"
    quota.write_text("300000\n")
    period.write_text("100000\n")
    assert cpus.cgroup_cpu_limit(tmp_path / "none", quota, period) == 3.0
    quota.write_text("-1\n")
    assert cpus.cgroup_cpu_limit(tmp_path / "none", quota, period) is None


def test_available_cpus_is_the_affinity_capped_by_the_quota(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5, 6, 7})
    monkeypatch.setattr(os, "cpu_count", lambda: 64)  # the machine; not what this process may use
    monkeypatch.setattr(cpus, "cgroup_cpu_limit", lambda: None)
    assert cpus.available_cpus() == 8
    monkeypatch.setattr(cpus, "cgroup_cpu_limit", lambda: 2.5)  # e.g. a pod's `limits: cpu: 2500m`
    assert cpus.available_cpus() == 3
    monkeypatch.setattr(cpus, "cgroup_cpu_limit", lambda: 0.2)
    assert cpus.available_cpus() == 1


def test_schedule_splits_the_available_cpus_between_workers(monkeypatch):
    from distrain.orchestration import local

    commands = local.worker_commands(2, 1, ["--config", "c.yaml"], gpus=[], cpu_count=6)
    assert all("train.cpu_threads=3" in cmd for cmd, _ in commands)
