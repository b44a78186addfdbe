"""End to end: a binary study (digits, 'is it an 8?', focal loss, flip TTA) through OOF, voting, stacking,
OOF-tuned thresholds and the registered pyfunc model."""

import io
import json

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from distrain.study.metrics import score

from conftest import REPO, distrain_run, e2e_timeout

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def binary_run(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("binary")
    proc = distrain_run(cwd, "cv.folds=3", "cv.seeds=[1]", "train.epochs=3", "train.loss=focal",
                        "train.focal_alpha=0.25", "tta.hflip=true", config=REPO / "configs" / "digits_binary.yaml",
                        timeout=e2e_timeout(900))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = cwd / "runs" / "digits-binary"
    return cwd, run_dir, json.loads((run_dir / "report.json").read_text()), proc


def test_binary_study_reports_thresholds_tuned_on_oof(binary_run):
    cwd, run_dir, report, proc = binary_run
    assert report["task"] == "binary" and report["metric"] == "f1"
    assert set(report["thresholds"]) == {"best_single", "soft_vote", "weighted_vote", "stacking"}
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
    assert meta["threshold"] == report["thresholds"]["stacking"]["threshold"]
    assert meta["classes"] == ["other", "8"]
    index = json.loads((cwd / "data" / "digits-binary" / "index.json").read_text())
    urls = [str(cwd / "data" / "digits-binary" / s) for s in index["shards"]["test"]]
    rows = sorted((s["__key__"], np.asarray(Image.open(io.BytesIO(s["png"]))), int(s["cls"]))
                  for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False))  # fmt: skip
    images, labels = np.stack([r[1] for r in rows]), np.array([r[2] for r in rows])
    mlflow.set_tracking_uri(report["mlflow"]["tracking_uri"])
    model = mlflow.pyfunc.load_model(report["ensemble_model"]["uri"])
    probs = model.predict(images)
    with np.load(run_dir / "ensemble" / "stacking_test.npz") as z:  # the jobs' test predictions, made with TTA
        np.testing.assert_allclose(probs, z["probs"], atol=1e-5)
    assert all(job["tta"]["hflip"] for job in meta["jobs"])
    decided = model.predict(images, params={"output": "labels"})
    assert probs.shape == (len(labels), 2)
    assert (decided == (probs[:, 1] >= meta["threshold"])).all()
    assert score("f1", labels, probs, threshold=meta["threshold"]) == pytest.approx(
        report["thresholds"]["stacking"]["test_tuned"], abs=1e-6
    )
