"""End to end: a segmentation study on generated shapes (configs/synth_shapes.yaml, made tiny) through mask
training, OOF class maps, mean IoU of jobs and of the map ensembles, and the MLflow review."""

import json

import numpy as np
import pytest

from distrain.data.masks import samples_from_masks
from distrain.data.pack import write_dataset
from distrain.data.synth_shapes import SHAPE_CLASSES, write_synth_shapes
from distrain.tasks.semantic import grid_side

from conftest import REPO, cli_in, distrain_run_here

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("synth_shapes")
    write_synth_shapes(cwd / "raw", 40, size=(64, 64))
    samples, classes = samples_from_masks(cwd / "raw" / "images", cwd / "raw" / "masks", SHAPE_CLASSES)
    write_dataset(samples, cwd / "data" / "synth_shapes", classes=classes, test_fraction=0.2)
    proc = distrain_run_here(cwd, "data.source=shards", "data.image_size=64", "cv.folds=2", "cv.seeds=[1,2]",
                             "train.epochs=2", "model.neck_channels=16", "train.progress=false",
                             config=REPO / "configs" / "synth_shapes.yaml")  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    run_dir = cwd / "runs" / "synth_shapes"
    return cwd, run_dir, json.loads((run_dir / "report.json").read_text()), proc


def test_the_study_reports_mean_iou_of_jobs_and_map_ensembles(study):
    cwd, run_dir, report, proc = study
    assert report["task"] == "segmentation" and report["metric"] == "miou" and len(report["jobs"]) == 4
    for job in report["jobs"]:
        assert 0 <= job["val_score"] <= 1 and 0 <= job["test_score"] <= 1
    assert list(report["ensembles"]) == ["best_single", "mean_of_maps", "k_of_n", "fold_vote"]
    details = report["ensemble_details"]
    assert details["k_of_n"] == {"k": 2, "n": 2} and details["fold_vote"]["k"] == 2  # ceil(0.6 x 2)
    best = details["best_single_column"]
    assert report["ensembles"]["best_single"]["cv"] == max(details["column_cv"].values()) == details["column_cv"][best]


def test_oof_rows_hold_every_class_map_and_cover_every_cv_image(study):
    cwd, run_dir, report, _ = study
    index = json.loads((cwd / "data" / "synth_shapes" / "index.json").read_text())
    cv_ids = sorted(s["sample_id"] for s in index["samples"] if s["split"] == "cv")
    side = grid_side(64, 4)
    seen = []
    for k in range(2):
        oof = np.load(run_dir / "jobs" / f"test_resnet-s1-f{k}" / "oof.npz")
        assert oof["probs"].shape[1] == 4 * side * side and oof["labels"].shape[1] == side * side
        assert np.allclose(oof["probs"].reshape(len(oof["probs"]), 4, -1).sum(1), 1, atol=1e-4)
        seen += list(oof["sample_ids"])
    assert sorted(seen) == cv_ids


def test_mlflow_holds_the_ensembles(study):
    from mlflow.tracking import MlflowClient

    _, _, report, _ = study
    parent = MlflowClient(report["mlflow"]["tracking_uri"]).get_run(report["mlflow"]["parent_run_id"])
    assert parent.data.metrics["mean_of_maps_cv"] == pytest.approx(report["ensembles"]["mean_of_maps"]["cv"])
    assert parent.data.metrics["fold_vote_test"] == pytest.approx(report["ensembles"]["fold_vote"]["test"])


def test_predict_and_the_registered_model_give_masks_of_each_images_size_from_the_scored_maps(
    study, tmp_path, capsys, monkeypatch
):
    import mlflow
    import mlflow.pyfunc
    from PIL import Image

    from distrain.serving.masks import MaskPredictor
    from distrain.tasks.semantic import mask_scores

    cwd, run_dir, report, _ = study
    index = json.loads((cwd / "data" / "synth_shapes" / "index.json").read_text())
    holdout = sorted(s["sample_id"] for s in index["samples"] if s["split"] == "test")
    served = report["ensemble_model"]["ensemble"]
    assert served in ("best_single", "mean_of_maps")
    predictor = MaskPredictor(run_dir / "ensemble" / "model")  # the maps it serves score the holdout as reported
    images = [Image.open(cwd / "raw" / "images" / f"{name}.png") for name in holdout]
    truth = [np.asarray(Image.open(cwd / "raw" / "masks" / f"{name}.png")) for name in holdout]
    side = grid_side(64, 4)
    rows = np.stack([predictor.grid_maps(image)[0].reshape(-1) for image in images])
    labels = np.stack([t[np.ix_(np.arange(side) * 64 // side, np.arange(side) * 64 // side)].ravel() for t in truth])
    assert mask_scores(labels, rows)["miou"] == pytest.approx(report["ensembles"][served]["test"], abs=1e-6)
    out = tmp_path / "masks"
    proc = cli_in(capsys, monkeypatch, cwd, "predict", "--run-dir", str(run_dir), "--images",
                  str(cwd / "raw" / "images"), "--out", str(out))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    written = sorted(p.name for p in out.glob("*.png"))
    assert written == sorted(p.name for p in (cwd / "raw" / "images").glob("*.png"))
    mlflow.set_tracking_uri(report["mlflow"]["tracking_uri"])
    model = mlflow.pyfunc.load_model(report["ensemble_model"]["uri"])
    masks = model.predict(images)
    for name, mask in zip(holdout, masks):
        assert mask.shape == (64, 64) and np.array_equal(mask, np.asarray(Image.open(out / f"{name}.png")))
