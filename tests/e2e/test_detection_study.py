"""End to end: a text-detection study on generated receipts (configs/synth_text.yaml, made tiny) through dense
training, OOF maps, H-mean with post-processing tuned on OOF, box and fold voting and the MLflow review; a dense
job SIGKILLed mid-epoch resumes bit-identical; two DDP processes give the same fold manifest and a complete OOF."""

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from distrain.data.detection import samples_from_detection
from distrain.data.pack import write_dataset
from distrain.data.synth_text import write_synth_text
from distrain.ensembles.dense import votes_needed

from conftest import REPO, RUN_PY, child_env, cli_in, distrain_run, e2e_timeout, run_cmd

pytestmark = pytest.mark.slow

CONFIG = REPO / "configs" / "synth_text.yaml"
TINY = ["data.image_size=64", "data.image_size_schedule={}", "model.neck_channels=16", "cv.seeds=[1]",
        "train.batch_size=4", "train.progress=false", "train.cpu_threads=1"]  # fmt: skip


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """40 receipts (the config's own source packs 240 on first use: tests/data/test_synth_text.py), 3 folds."""
    cwd = tmp_path_factory.mktemp("synth_text")
    write_synth_text(cwd / "raw", 40)
    samples, classes = samples_from_detection(cwd / "raw" / "annotations.json", cwd / "raw" / "images")
    write_dataset(samples, cwd / "data" / "synth_text", classes=classes, test_fraction=0.2)
    proc = distrain_run(cwd, *TINY, "data.source=shards", "cv.folds=3", "train.epochs=2", config=CONFIG,
                        timeout=e2e_timeout(600))  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    run_dir = cwd / "runs" / "synth_text"
    return cwd, run_dir, json.loads((run_dir / "report.json").read_text()), proc


def test_the_study_reports_h_mean_of_jobs_and_ensembles_with_post_processing_tuned_on_oof(study):
    cwd, run_dir, report, proc = study
    assert report["task"] == "text_detection" and report["metric"] == "hmean"
    assert [j["id"] for j in report["jobs"]] == [f"test_resnet-s1-f{k}" for k in range(3)]
    for job in report["jobs"]:
        assert 0 <= job["val_score"] <= 1 and 0 <= job["test_score"] <= 1 and 0 <= job["val_pixel_f1"] <= 1
    assert list(report["ensembles"]) == ["best_single", "map_average", "box_vote", "fold_vote"]
    assert report["ensembles"]["fold_vote"]["cv"] is None  # a CV image has one model per column
    assert all(0 <= s["test"] <= 1 for s in report["ensembles"].values())
    details = report["ensemble_details"]
    assert details["fold_vote"]["k"] == votes_needed(0.6, 3) == 2 and details["fold_vote"]["n"] == 3
    tuned = json.loads((run_dir / "ensemble" / "postprocess.json").read_text())
    assert set(tuned) == {"test_resnet-s1", "map_average"}
    assert sorted(tuned["test_resnet-s1"]["per_fold"]) == ["0", "1", "2"]  # each fold's settings chosen without it
    assert tuned["test_resnet-s1"]["cv_tuned"] == report["ensembles"]["best_single"]["cv"]
    assert "post-processing tuned on OOF" in proc.stdout and "fold_vote" in proc.stdout


def test_oof_maps_are_bounded_rows_with_label_rows_and_cover_every_cv_image(study):
    cwd, run_dir, report, _ = study
    index = json.loads((cwd / "data" / "synth_text" / "index.json").read_text())
    cv_ids = {s["sample_id"] for s in index["samples"] if s["split"] == "cv"}
    seen = []
    for k in range(3):
        oof = np.load(run_dir / "jobs" / f"test_resnet-s1-f{k}" / "oof.npz")
        assert oof["probs"].shape[1] == 64 * 64 and oof["probs"].dtype == np.float32
        assert oof["labels"].dtype == np.uint8 and set(np.unique(oof["labels"])) <= {0, 1, 2}
        seen += list(oof["sample_ids"])
    assert sorted(seen) == sorted(cv_ids)


def test_mlflow_holds_the_study_metrics_and_the_review(study):
    from mlflow.tracking import MlflowClient

    cwd, run_dir, report, _ = study
    client = MlflowClient(report["mlflow"]["tracking_uri"])
    parent = client.get_run(report["mlflow"]["parent_run_id"])
    assert parent.data.metrics["box_vote_cv"] == pytest.approx(report["ensembles"]["box_vote"]["cv"])
    assert parent.data.metrics["fold_vote_test"] == pytest.approx(report["ensembles"]["fold_vote"]["test"])
    review = {a.path for a in client.list_artifacts(parent.info.run_id, "review")}
    worst = sorted(p for p in review if p.startswith("review/worst-"))
    assert review - set(worst) == {"review/postprocess.json", "review/summary.md"} and len(worst) == 4
    scores = [float(p.rsplit("-", 1)[1].removesuffix(".png")) for p in worst]  # worst-<rank>-<id>-hmean-<h>.png
    assert scores == sorted(scores) and scores[0] <= report["ensembles"]["best_single"]["cv"]


def test_two_ddp_processes_give_the_same_fold_manifest_and_a_complete_oof(study, tmp_path):
    cwd, run_dir, _, _ = study
    proc = distrain_run(tmp_path, *TINY, "data.source=shards", "cv.folds=3", "train.epochs=1",
                        f"data.root={cwd / 'data' / 'synth_text'}", config=CONFIG, processes=2,
                        timeout=e2e_timeout(600))  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    ddp_dir = tmp_path / "runs" / "synth_text"
    manifest = json.loads((run_dir / "folds.json").read_text())
    assert json.loads((ddp_dir / "folds.json").read_text()) == manifest
    for k in range(3):
        ids = np.load(ddp_dir / "jobs" / f"test_resnet-s1-f{k}" / "oof.npz")["sample_ids"]
        ref = np.load(run_dir / "jobs" / f"test_resnet-s1-f{k}" / "oof.npz")["sample_ids"]
        assert sorted(ids) == sorted(ref) and len(set(ids)) == len(ids)


RESUME = [*TINY, "data.source=shards", "cv.folds=2", "cv.only_folds=[0]", "train.epochs=2", "train.batch_size=2",
          "train.deterministic=true", "scheduler.lease_timeout_s=1.5", "scheduler.heartbeat_s=0.2",
          "scheduler.poll_s=0.2"]  # fmt: skip


def test_a_sigkilled_dense_job_resumes_bit_identical(study, tmp_path):
    cwd = study[0]
    data = f"data.root={cwd / 'data' / 'synth_text'}"  # (data.source=shards is in RESUME)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    straight.mkdir(), killed.mkdir()
    base = [sys.executable, str(RUN_PY), "--config", str(CONFIG), *RESUME, data]
    assert run_cmd(base, straight, timeout=e2e_timeout(600)).returncode == 0
    job = "test_resnet-s1-f0"
    state_dir = killed / "runs" / "synth_text" / "jobs" / job / "state"
    worker = subprocess.Popen(base + ["scheduler.checkpoint_every_s=0"], cwd=killed, env=child_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    steps = _steps_per_epoch(straight / "runs" / "synth_text")
    deadline = time.monotonic() + e2e_timeout(300)
    while time.monotonic() < deadline:  # a checkpoint a few steps into epoch 1
        assert worker.poll() is None, worker.stdout.read()
        names = sorted(state_dir.glob("state-*.json")) if state_dir.is_dir() else []
        if names and int(names[-1].stem.split("-")[1]) in range(steps + 2, 2 * steps - 2):
            break
        time.sleep(0.005)
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    time.sleep(1.6)  # the dead worker's lease expires
    resumed = run_cmd(base + ["scheduler.checkpoint_every_s=0"], killed, timeout=e2e_timeout(600))
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stdout[-2000:]
    a, b = (d / "runs" / "synth_text" / "jobs" / job for d in (straight, killed))
    best_a, best_b = (torch.load(d / "best.pt", weights_only=True)["model"] for d in (a, b))
    assert all(torch.equal(v, best_b[k]) for k, v in best_a.items())
    assert np.array_equal(np.load(a / "oof.npz")["probs"], np.load(b / "oof.npz")["probs"])
    hist_a, hist_b = (json.loads((d / "metrics.json").read_text()) for d in (a, b))
    assert [h["train_loss"] for h in hist_a] == [h["train_loss"] for h in hist_b]


def _steps_per_epoch(run_dir) -> int:
    """Training steps of the resumed job's epoch (its fold's training samples / batch size 2)."""
    folds = json.loads((run_dir / "folds.json").read_text())
    return sum(1 for f in folds["fold_of_sample"].values() if f != 0) // 2


def test_predict_and_the_registered_model_give_the_voted_boxes_that_scored_the_holdout(
    study, tmp_path, capsys, monkeypatch
):
    from distrain.tasks.detection.geometry import TextRegions
    from distrain.tasks.detection.hmean import hmean_counts

    cwd, run_dir, report, _ = study
    index = json.loads((cwd / "data" / "synth_text" / "index.json").read_text())
    holdout = {s["sample_id"] for s in index["samples"] if s["split"] == "test"}
    folder = tmp_path / "holdout"
    folder.mkdir()
    for name in holdout:
        (folder / f"{name}.jpg").write_bytes((cwd / "raw" / "images" / f"{name}.jpg").read_bytes())
    proc = cli_in(capsys, monkeypatch, cwd, "predict", "--run-dir", str(run_dir), "--images", str(folder),
                  "--out", str(tmp_path / "boxes.json"))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    entries = json.loads((tmp_path / "boxes.json").read_text())["images"]
    assert sorted(e["file"] for e in entries) == sorted(f"{n}.jpg" for n in holdout)
    truth = {e["file"]: e for e in json.loads((cwd / "raw" / "annotations.json").read_text())["images"]}
    truths = [TextRegions.from_json(json.dumps(truth[e["file"]])) for e in entries]
    found = [TextRegions([w["points"] for w in e["words"]]) for e in entries]
    assert hmean_counts(truths, found).hmean == pytest.approx(report["ensembles"]["fold_vote"]["test"], abs=1e-9)
    import mlflow
    import mlflow.pyfunc
    from PIL import Image

    mlflow.set_tracking_uri(report["mlflow"]["tracking_uri"])  # the registered model gives the same boxes
    served = mlflow.pyfunc.load_model(report["ensemble_model"]["uri"])
    images = [Image.open(folder / e["file"]) for e in entries]
    assert served.predict(images) == [[{k: w[k] for k in ("points", "score")} for w in e["words"]] for e in entries]
    bad = cli_in(capsys, monkeypatch, cwd, "predict", "--run-dir", str(run_dir), "--shards", str(folder),
                 "--out", str(tmp_path / "x.json"))  # fmt: skip
    assert bad.returncode == 2 and "a text_detection study predicts --images DIR" in bad.stderr
    assert (
        report["ensemble_model"]["name"] == "distrain-synth_text"
        and report["ensemble_model"]["ensemble"] == "fold_vote"
    )
