"""End to end: a finished study grows by a seed (only the new jobs train, the study is aggregated once more,
MLflow keeps one study run), and a grown config that touches what the finished jobs depended on is refused;
two run directories that share a fold manifest are ensembled together, and two that do not are refused."""

import hashlib
import json
import shutil
import sys

import pytest
from mlflow.tracking import MlflowClient

from distrain.config import yaml_load
from distrain.orchestration.ledger import Ledger, aggregate_id

from conftest import REPO, cli_in, distrain_run, e2e_timeout, holdout_images, last_line, run_cmd, run_in

DIGITS = REPO / "configs" / "digits.yaml"

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


def test_a_worker_of_the_plan_before_growth_publishes_nothing(grown):
    """A worker started with cv.seeds=[1] before the run grew comes to aggregate: config.yaml now plans 4 jobs, so
    its report of 2 would replace the grown one; it says so and publishes nothing."""
    import threading
    from types import SimpleNamespace

    from distrain.config import load_config
    from distrain.distributed.ranks import Ranks
    from distrain.orchestration import experiment
    from distrain.orchestration.phases import grown_since

    cwd, *_ = grown
    run_dir = cwd / "runs" / "digits"
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    said = []
    stale = SimpleNamespace(cfg=load_config(None, [*TINY, "cv.seeds=[1]"]), run_dir=run_dir, stop=threading.Event(),
                            index=SimpleNamespace(labels_of=lambda split: {}), ranks=Ranks(log=said.append),
                            manifest=SimpleNamespace(fold_of_sample={}))  # fmt: skip
    experiment.aggregate(stale, [], claim=None)  # the worker's aggregation step (its tracker is never reached)
    assert len(said) == 1 and "grew to 4 jobs" in said[0] and "plan of 2" in said[0]
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before
    assert grown_since(load_config(None, [*TINY, "cv.seeds=[1,2]"]), run_dir) is None


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
def test_grown_config_changing_what_finished_jobs_depended_on_is_refused(
    grown, overrides, key, capsys, monkeypatch, fresh_accelerate_state
):
    cwd, *_ = grown
    run_dir = cwd / "runs" / "digits"
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and "mlruns" not in p.parts}
    proc = run_in(capsys, monkeypatch, cwd, "--config", str(DIGITS), *TINY, *overrides)
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = last_line(proc.stderr)
    assert "was run with another config" in line and key in line and "grows only by new cv.seeds" in line
    after = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and "mlruns" not in p.parts}
    assert after == before  # nothing written


def test_aggregate_again_with_a_column_excluded_by_hand(grown, capsys, monkeypatch):
    cwd, *_ = grown
    run_dir = cwd / "runs" / "digits"
    cli = ["aggregate", "--run-dir", str(run_dir)]
    refused = cli_in(capsys, monkeypatch, cwd, *cli, "train.epochs=3")
    assert refused.returncode == 2 and "ensemble.* keys only" in last_line(refused.stderr)
    proc = cli_in(capsys, monkeypatch, cwd, *cli, "ensemble.members.exclude=[test_resnet-s1]")
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((run_dir / "report.json").read_text())
    details = report["ensemble_details"]
    assert details["columns"] == ["test_resnet-s2"] and details["excluded"] == ["test_resnet-s1"]
    assert sorted(j["id"] for j in report["jobs"]) == job_ids([2])
    assert yaml_load((run_dir / "config.yaml").read_text())["ensemble"]["members"]["exclude"] == ["test_resnet-s1"]


def files_of(folder):
    """{relative path: sha256} of every file under `folder`."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*")
            if p.is_file()}  # fmt: skip


def aggregate_cmd(*args):
    return [sys.executable, "-m", "distrain.cli", "aggregate", *args]


@pytest.fixture(scope="module")
def combined(grown):
    """The grown study (runs/digits: test_resnet seeds 1 and 2) and another (runs/other: test_resnet seed 1 at
    another learning rate, so its checkpoints differ) ensembled by `distrain aggregate --run-dir --run-dir`:
    (cwd, the aggregate process, the two run directories' files before it)."""
    cwd, *_ = grown
    other = distrain_run(cwd, *TINY, "cv.seeds=[1]", "experiment=other", "optim.lr=0.004", timeout=e2e_timeout(600))
    assert other.returncode == 0, other.stderr[-3000:]
    runs = cwd / "runs"
    before = {name: files_of(runs / name) for name in ("digits", "other")}
    proc = run_cmd(aggregate_cmd("--run-dir", "runs/digits", "--run-dir", "runs/other"), cwd, e2e_timeout(300))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cwd, proc, before


def test_run_directories_sharing_a_fold_manifest_ensemble_together(combined):
    cwd, proc, before = combined
    runs = cwd / "runs"
    report = json.loads((runs / "digits+other" / "report.json").read_text())
    columns = ["digits/test_resnet-s1", "digits/test_resnet-s2", "other/test_resnet-s1"]  # same column: prefixed
    assert sorted(report["ensemble_details"]["columns"]) == columns
    assert sorted(j["id"] for j in report["jobs"]) == sorted(f"{c}-f{f}" for c in columns for f in (0, 1))
    assert [s["prefix"] for s in report["sources"]] == ["digits/", "other/"]
    assert set(report["ensemble_details"]["selection"]["weights"]) <= set(columns)
    assert "stacking" in report["ensembles"] and "digits/test_resnet-s1" in proc.stdout + json.dumps(report)
    for name in ("digits", "other"):  # the run directories are only read
        assert files_of(runs / name) == before[name]


def test_model_across_run_directories_serves_each_ones_checkpoints(combined):
    import mlflow
    import mlflow.pyfunc
    import numpy as np

    cwd, *_ = combined
    out = cwd / "runs" / "digits+other"
    report = json.loads((out / "report.json").read_text())
    assert report["ensemble_model"]["name"] == "distrain-digits+other"
    meta = json.loads((out / "ensemble" / "model" / "meta.json").read_text())
    assert {j["model"] for j in meta["jobs"]} == {"test_resnet"}  # the backbone each was trained as
    for job in meta["jobs"]:  # each checkpoint is its own run directory's best.pt
        run, job_id = job["id"].split("/")
        src = cwd / "runs" / run / "jobs" / job_id / "best.pt"
        assert (out / "ensemble" / "model" / "checkpoints" / job["checkpoint"]).read_bytes() == src.read_bytes()
    digits, other = (cwd / "runs" / r / "jobs" / "test_resnet-s1-f0" / "best.pt" for r in ("digits", "other"))
    assert digits.read_bytes() != other.read_bytes()  # so a mix-up of the two would show
    mlflow.set_tracking_uri(report["mlflow"]["tracking_uri"])
    ids, images = holdout_images(cwd)
    probs = mlflow.pyfunc.load_model(report["ensemble_model"]["uri"]).predict(images)
    with np.load(out / "ensemble" / "model_test.npz") as z:
        assert z["sample_ids"].tolist() == ids
        np.testing.assert_allclose(probs, z["probs"], atol=1e-5)


def test_run_directories_with_different_fold_manifests_are_refused(combined, capsys, monkeypatch):
    from distrain.study.folds import FoldManifest, build_fold_manifest

    cwd, *_ = combined
    runs = cwd / "runs"
    shutil.copytree(runs / "other", runs / "other7")  # the same run, with the folds of cv.fold_seed=7
    ours = FoldManifest.from_json((runs / "other" / "folds.json").read_text())
    ids = sorted(ours.fold_of_sample)
    theirs = build_fold_manifest(ids, [k % 2 for k in range(len(ids))], 2, 7)  # the same samples, other folds
    assert theirs.hash != ours.hash
    (runs / "other7" / "folds.json").write_text(theirs.to_json())
    proc = cli_in(capsys, monkeypatch, cwd, *aggregate_cmd("--run-dir", "runs/digits", "--run-dir", "runs/other7")[3:])
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = last_line(proc.stderr)
    assert "different fold manifests" in line and ours.hash[:12] in line and theirs.hash[:12] in line
    assert not (runs / "digits+other7").exists()  # nothing written
    argv = aggregate_cmd("--run-dir", "runs/digits", "--run-dir", "runs/other", "--out", "runs/other7")[3:]
    proc = cli_in(capsys, monkeypatch, cwd, *argv)
    assert proc.returncode == 2 and "a training run directory" in last_line(proc.stderr)
