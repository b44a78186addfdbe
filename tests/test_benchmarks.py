"""The GPU benchmark's smoke mode: the same code as the one-call GPU run (`benchmarks/gpu.py`, GPU.md), on the CPU
at tiny sizes, so the script a scarce GPU session runs is known to work before it gets there."""

import json
import sys

import pytest

from conftest import REPO, run_cmd


@pytest.mark.slow
def test_gpu_benchmark_smoke_runs_every_phase_and_ends_with_one_json_line(tmp_path):
    out = tmp_path / "gpu.jsonl"
    proc = run_cmd([sys.executable, str(REPO / "benchmarks" / "gpu.py"), "--smoke", "--out", str(out)], tmp_path,
                   timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[0]["phase"] == "environment" and rows[0]["smoke"] is True
    measured = {r["variant"]: r for r in rows if r["phase"] == "a" and "ratio" in r}
    assert set(measured) == {"fp32", "bf16", "bf16+grad_ckpt"}, rows
    assert all(r["distrain"]["images_per_s"] > 0 and r["bare"]["images_per_s"] > 0 for r in measured.values())
    (e2e,) = [r for r in rows if r["phase"] == "b"]
    assert e2e["samples_per_s"] > 0 and e2e["input_bound_fraction"] > 0
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["a:bf16"]["ratio"] == measured["bf16"]["ratio"] and "b:e2e" in summary
