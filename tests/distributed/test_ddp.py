import json

import pytest

from distrain.data.pack import write_digits

from conftest import REPO, accelerate_launch, run_cmd


def test_two_process_ddp_gather_has_no_duplicates(tmp_path):
    write_digits(tmp_path / "digits", shard_size=100)
    proc = run_cmd(
        [
            *accelerate_launch(2, REPO / "tests" / "scripts" / "ddp_gather_check.py"),
            str(tmp_path / "digits"),
            str(tmp_path),
        ],
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("rank*.json"))]
    assert sorted(r["rank"] for r in rows) == [0, 1] and all(r["world"] == 2 for r in rows)
    for r in rows:
        assert r["rows"] == r["distinct"] == r["expected"] and r["covers"]
        assert r["gathered_ranks"] == 2 and r["sum"] == 2.0
    assert rows[0]["digest"] == rows[1]["digest"]  # every rank holds the same gathered ids and probabilities


@pytest.mark.slow  # a 2-process launch that waits out timeouts (14 s)
def test_rank0_work_longer_than_the_collective_timeout_completes_and_a_stalled_collective_fails_in_its_bound(
    tmp_path,
):
    """2 gloo processes with train.collective_timeout_s = 2: rank 0 works alone for 5 s (as an aggregation with its
    MLflow upload does) and both ranks get its result, waiting on the control group; then one rank left alone in an
    all-reduce gives up after about 2 s instead of NCCL's 10 minutes."""
    proc = run_cmd([*accelerate_launch(2, REPO / "tests" / "scripts" / "control_group_check.py"), str(tmp_path)],
                   cwd=tmp_path, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("rank*.json"))]
    assert len(rows) == 2 and all(r["result"] == "aggregated" and r["total"] == 2.0 for r in rows)
    assert all(r["waited"] >= 5.0 for r in rows)  # longer than the collective timeout, and no abort
    waiting = rows[1]
    assert waiting["error"] and 1.5 <= waiting["stalled"] < 5.5, waiting


@pytest.mark.slow  # a 2-process epoch (11 s)
def test_the_training_step_adds_at_most_one_collective_per_sync_every_steps(tmp_path):
    """2 gloo processes train an epoch of the main job: besides DDP's own gradient all-reduce, the ranks talk once
    per `train.sync_every_steps` (8) optimizer steps (stop / checkpoint agreement) and once at the epoch's end (its
    training sums); no per-step all-reduce and `.tolist()` as before (a device sync per step on a GPU)."""
    overrides = ["model.names=[test_resnet]", "data.image_size=16", "cv.folds=2", "cv.seeds=[1]", "cv.only_folds=[0]",
                 "train.epochs=2", "train.batch_size=16", "data.num_workers=0", "train.progress=false",
                 "ensemble.stacking=false", "ensemble.register_model=false",
                 f"run_root={tmp_path / 'runs'}"]  # fmt: skip
    argv = [*accelerate_launch(2, REPO / "tests" / "scripts" / "collective_count.py"), str(tmp_path)]
    proc = run_cmd([*argv, "--config", str(REPO / "configs" / "digits.yaml"), *overrides], cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for path in sorted(tmp_path.glob("rank*.json")):
        for epoch in json.loads(path.read_text()):
            steps = epoch["optimizer_steps"]
            assert steps >= 16, epoch  # enough steps for the bound to mean something
            assert epoch["collectives"] <= steps // 8 + 2, epoch
            print(f"{path.stem} epoch {epoch['epoch']}: {epoch['collectives']} collectives in {steps} optimizer steps")
