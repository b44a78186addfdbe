"""End to end: a binary study (digits, 'is it an 8?', focal loss, flip TTA) and a multilabel study (digits'
properties, BCE with Mixup) through OOF, voting, stacking, OOF-tuned thresholds and the registered pyfunc model."""

import csv
import io
import json

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from distrain.tasks import get_task

from conftest import REPO, cli_in, distrain_run_here

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def binary_run(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("binary")
    proc = distrain_run_here(cwd, "cv.folds=3", "cv.seeds=[1]", "train.epochs=2", "train.loss=focal",
                             "train.focal_alpha=0.25", "tta.hflip=true",
                             config=REPO / "configs" / "digits_binary.yaml")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = cwd / "runs" / "digits-binary"
    return cwd, run_dir, json.loads((run_dir / "report.json").read_text()), proc


def test_binary_study_reports_thresholds_tuned_on_oof(binary_run):
    cwd, run_dir, report, proc = binary_run
    assert report["task"] == "binary" and report["metric"] == "f1"
    assert set(report["thresholds"]) == {"best_single", "soft_vote", "weighted_vote", "selection", "stacking"}
    for name, t in report["thresholds"].items():
        assert 0 < t["threshold"] < 1 and sorted(t["fold_thresholds"]) == ["0", "1", "2"]
        assert t["cv_at_0.5"] == pytest.approx(report["ensembles"][name]["cv"], abs=0.01)  # argmax vs 0.5
        assert t["test_tuned"] is not None and t["cv_tuned"] is not None
    assert "threshold tuned on OOF" in proc.stdout
    oof = np.load(next(run_dir.glob("jobs/*/oof.npz")))
    assert oof["probs"].shape[1] == 2 and set(np.unique(oof["labels"])) == {0, 1}


def test_registered_binary_model_decides_with_the_tuned_threshold(binary_run):
    import mlflow
    import mlflow.pyfunc

    cwd, run_dir, report, _ = binary_run
    meta = json.loads((run_dir / "ensemble" / "model" / "meta.json").read_text())
    chosen = report["ensemble_model"]["ensemble"]
    assert meta["ensemble"] == chosen and meta["threshold"] == report["thresholds"][chosen]["threshold"]
    assert meta["classes"] == ["other", "8"]
    index = json.loads((cwd / "data" / "digits-binary" / "index.json").read_text())
    urls = [str(cwd / "data" / "digits-binary" / s) for s in index["shards"]["test"]]
    rows = sorted((s["__key__"], np.asarray(Image.open(io.BytesIO(s["png"]))), int(s["cls"]))
                  for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False))  # fmt: skip
    images, labels = np.stack([r[1] for r in rows]), np.array([r[2] for r in rows])
    mlflow.set_tracking_uri(report["mlflow"]["tracking_uri"])
    model = mlflow.pyfunc.load_model(report["ensemble_model"]["uri"])
    probs = model.predict(images)
    with np.load(run_dir / "ensemble" / "model_test.npz") as z:  # from the jobs' test predictions, made with TTA
        np.testing.assert_allclose(probs, z["probs"], atol=1e-5)
    assert all(job["tta"]["hflip"] for job in meta["jobs"])
    decided = model.predict(images, params={"output": "labels"})
    assert probs.shape == (len(labels), 2)
    assert (decided == (probs[:, 1] >= meta["threshold"])).all()
    assert get_task("binary").score("f1", labels, probs, threshold=meta["threshold"]) == pytest.approx(
        report["thresholds"][chosen]["test_tuned"], abs=1e-6
    )


@pytest.fixture(scope="module")
def multilabel_run(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("multilabel")
    proc = distrain_run_here(cwd, "cv.folds=3", "cv.seeds=[1]", "train.epochs=3", "augment.mixup=0.2",
                             config=REPO / "configs" / "digits_multilabel.yaml")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = cwd / "runs" / "digits-multilabel"
    return cwd, run_dir, json.loads((run_dir / "report.json").read_text()), proc


def _holdout(cwd, name):
    """(sample ids, 8x8 images, labels as stored in the shards' .cls: the label indices) of the holdout split."""
    index = json.loads((cwd / "data" / name / "index.json").read_text())
    urls = [str(cwd / "data" / name / s) for s in index["shards"]["test"]]
    rows = sorted((s["__key__"], np.asarray(Image.open(io.BytesIO(s["png"]))), s["cls"].decode())
                  for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False))  # fmt: skip
    return [r[0] for r in rows], np.stack([r[1] for r in rows]), [r[2] for r in rows]


def test_multilabel_study_keeps_label_rows_and_tunes_a_threshold_per_label(multilabel_run):
    cwd, run_dir, report, proc = multilabel_run
    assert report["task"] == "multilabel" and report["metric"] == "f1_macro"
    oof = np.load(next(run_dir.glob("jobs/*/oof.npz")))
    assert oof["probs"].shape[1] == 4 and oof["labels"].shape == oof["probs"].shape
    assert ((oof["probs"] > 0) & (oof["probs"] < 1)).all() and not np.allclose(oof["probs"].sum(1), 1)  # sigmoids
    assert set(report["ensembles"]) >= {"soft_vote", "hard_vote", "weighted_vote", "k_of_n_vote", "stacking"}
    for name, t in report["thresholds"].items():
        assert len(t["threshold"]) == 4 and all(0 < v < 1 for v in t["threshold"])
        assert t["cv_at_0.5"] == pytest.approx(report["ensembles"][name]["cv"], abs=1e-9)
    assert report["ensembles"]["stacking"]["test"] > 0.6  # 4 labels learnt from 8x8 digits in 3 epochs
    assert "threshold tuned on OOF" in proc.stdout


def test_registered_multilabel_model_and_predict_decide_each_label_at_its_threshold(
    multilabel_run, tmp_path, capsys, monkeypatch
):
    import mlflow
    import mlflow.pyfunc

    cwd, run_dir, report, _ = multilabel_run
    meta = json.loads((run_dir / "ensemble" / "model" / "meta.json").read_text())
    assert meta["task"] == "multilabel" and meta["classes"] == ["even", "large", "loop", "prime"]
    chosen = report["ensemble_model"]["ensemble"]
    assert meta["threshold"] == report["thresholds"][chosen]["threshold"] and len(meta["boosters"]) == 3 * 4
    ids, images, stored = _holdout(cwd, "digits-multilabel")
    labels = np.array([[int(str(j) in cls.split()) for j in range(4)] for cls in stored])
    mlflow.set_tracking_uri(report["mlflow"]["tracking_uri"])
    model = mlflow.pyfunc.load_model(report["ensemble_model"]["uri"])
    probs = model.predict(images)
    with np.load(run_dir / "ensemble" / "model_test.npz") as z:
        np.testing.assert_allclose(probs, z["probs"], atol=1e-5)
    decided = model.predict(images, params={"output": "labels"})
    assert decided.shape == (len(ids), 4) and (decided == (probs >= np.array(meta["threshold"]))).all()
    assert get_task("multilabel").score("f1_macro", labels, probs, threshold=meta["threshold"]) == pytest.approx(
        report["thresholds"][chosen]["test_tuned"], abs=1e-6
    )
    out = tmp_path / "preds.csv"
    shards = cwd / "data" / "digits-multilabel"
    proc = cli_in(capsys, monkeypatch, cwd, "predict", "--run-dir", "runs/digits-multilabel", "--shards", str(shards),
                  "--out", str(out))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {r["image"]: r for r in csv.DictReader(out.open())}
    for sid, row in zip(ids, decided):
        assert rows[sid]["prediction"].split() == [meta["classes"][j] for j in np.flatnonzero(row)]
