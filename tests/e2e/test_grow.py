"""End to end: a finished study grows by a seed (only the new jobs train, the study is aggregated once more,
MLflow keeps one study run), and a grown config that touches what the finished jobs depended on is refused."""

import json
import sys

import pytest
from mlflow.tracking import MlflowClient

from distrain.config import yaml_load
from distrain.orchestration.ledger import Ledger, aggregate_id

from conftest import distrain_run, e2e_timeout, last_line, run_cmd

pytestmark = pytest.mark.slow

TINY = [
    "model.names=[test_resnet]",
    "data.image_size=16",
    "cv.folds=2",
    "train.epochs=1",
    "train.progress=false",
    "ensemble.selection_rounds=5",
]


def job_ids(seeds):
    return [f"test_resnet-s{s}-f{f}" for s in seeds for f in (0, 1)]


@pytest.fixture(scope="module")
def grown(tmp_path_factory):
    """A 2-fold x 1-seed study, then the same config with a second seed: (cwd, first run, grown run)."""
    cwd = tmp_path_factory.mktemp("grow")
    first = distrain_run(cwd, *TINY, "cv.seeds=[1]", timeout=e2e_timeout(600))
    assert first.returncode == 0, first.stderr[-3000:]
    second = distrain_run(cwd, *TINY, "cv.seeds=[1,2]", timeout=e2e_timeout(600))
    assert second.returncode == 0, second.stderr[-3000:]
    return cwd, first, second


def test_growing_by_a_seed_trains_only_the_new_jobs_and_aggregates_again(grown):
    cwd, first, second = grown
    run_dir = cwd / "runs" / "digits"
    assert "grows: cv.seeds: [1] -> [1, 2]" in second.stdout
    claimed = [line.split(" claimed ")[1].split()[0] for line in second.stdout.splitlines() if " claimed " in line]
    assert sorted(claimed) == job_ids([2])  # the log: only seed 2's jobs were claimed
    ledger = Ledger(run_dir)
    assert all(len(ledger.attempts(j)) == 1 for j in job_ids([1, 2]))  # the ledger: seed 1's jobs not re-run
    for plan in (job_ids([1]), job_ids([1, 2])):  # each plan aggregated exactly once
        assert [(a.end or {}).get("status") for a in ledger.attempts(aggregate_id(plan))] == ["done"]
    report = json.loads((run_dir / "report.json").read_text())
    assert sorted(j["id"] for j in report["jobs"]) == job_ids([1, 2])
    assert sorted(report["ensemble_details"]["selection"]["weights"]) == ["test_resnet-s1", "test_resnet-s2"]
    assert "test_resnet-s2" in report["ensemble_details"]["columns"]
    assert report["ensemble_model"]["version"] == "2"  # the grown study registered a new version
    assert yaml_load((run_dir / "config.yaml").read_text())["cv"]["seeds"] == [1, 2]  # the run dir's config grew


def test_grown_study_keeps_one_study_run_with_all_job_runs_and_new_ensemble_runs(grown):
    cwd, *_ = grown
    report = json.loads((cwd / "runs" / "digits" / "report.json").read_text())
    info = report["mlflow"]
    client = MlflowClient(info["tracking_uri"])
    runs = client.search_runs([info["experiment_id"]])
    studies = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert [r.info.run_id for r in studies] == [info["parent_run_id"]] and studies[0].info.status == "FINISHED"
    by_kind: dict[str, list] = {}
    for r in runs:
        if r.data.tags.get("mlflow.parentRunId") == info["parent_run_id"]:
            by_kind.setdefault(r.data.tags.get("distrain.kind"), []).append(r.info.run_name)
    assert sorted(by_kind["job"]) == job_ids([1, 2])
    assert sorted(n for kinds in by_kind.values() for n in kinds if n in ("voting", "stacking")) == [
        "stacking",
        "stacking",
        "voting",
        "voting",
    ]  # one pair per aggregation
    history = client.get_metric_history(info["parent_run_id"], "soft_vote_cv")
    assert sorted(m.step for m in history) == [2, 4]  # the study's summary, once per size it was aggregated at


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["cv.seeds=[1,2,3]", "cv.fold_seed=7"], "cv.fold_seed: 0 -> 7"),  # the fold manifest would change
        (["cv.seeds=[1,2,3]", "train.epochs=2"], "train.epochs: 1 -> 2"),  # the finished jobs' training
        (["cv.seeds=[2]"], "cv.seeds: [1, 2] -> [2]"),  # a finished seed dropped
    ],
)
def test_grown_config_changing_what_finished_jobs_depended_on_is_refused(grown, overrides, key):
    cwd, *_ = grown
    run_dir = cwd / "runs" / "digits"
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and "mlruns" not in p.parts}
    proc = distrain_run(cwd, *TINY, *overrides, timeout=e2e_timeout(300))
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = last_line(proc.stderr)
    assert "was run with another config" in line and key in line and "grows only by new cv.seeds" in line
    after = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and "mlruns" not in p.parts}
    assert after == before  # nothing written


def test_aggregate_again_with_a_column_excluded_by_hand(grown):
    cwd, *_ = grown
    run_dir = cwd / "runs" / "digits"
    cli = [sys.executable, "-m", "distrain.cli", "aggregate", "--run-dir", str(run_dir)]
    refused = run_cmd([*cli, "train.epochs=3"], cwd)
    assert refused.returncode == 2 and "ensemble.* keys only" in last_line(refused.stderr)
    proc = run_cmd([*cli, "ensemble.members.exclude=[test_resnet-s1]"], cwd, timeout=e2e_timeout(300))
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((run_dir / "report.json").read_text())
    details = report["ensemble_details"]
    assert details["columns"] == ["test_resnet-s2"] and details["excluded"] == ["test_resnet-s1"]
    assert sorted(j["id"] for j in report["jobs"]) == job_ids([2])
    assert yaml_load((run_dir / "config.yaml").read_text())["ensemble"]["members"]["exclude"] == ["test_resnet-s1"]
