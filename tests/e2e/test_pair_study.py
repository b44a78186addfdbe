"""End to end: a study of image pairs ("same digit?", packed from two arrays) trained by the main job with a siamese
test_resnet, ensembled, registered, and served by the MLflow pyfunc model from pairs of images."""

import csv
import io
import json
import time

import numpy as np
import pytest
from PIL import Image

from distrain.data.index import read_index
from distrain.data.shards import read_image, shard_samples

from conftest import digit_pairs, distrain_run_here

pytestmark = pytest.mark.slow


def test_a_pair_study_trains_registers_and_serves_its_holdout_pairs(tmp_path, capsys):
    import mlflow
    import mlflow.pyfunc

    from distrain import cli

    np.savez(tmp_path / "pairs.npz", **digit_pairs(600))
    out = tmp_path / "data" / "pairs"
    assert cli.main(["data", "pack", "--npz", str(tmp_path / "pairs.npz"), "--images", "xa,xb", "--out", str(out)]) == 0
    start = time.perf_counter()
    proc = distrain_run_here(tmp_path, "task=pair_binary", "data.source=shards", "data.root=data/pairs",
                             "data.num_classes=2", "cv.folds=2", "cv.seeds=[1]", "train.epochs=2", "data.image_size=16",
                             "model.names=[test_resnet]", "train.metric=roc_auc", "train.progress=false",
                             "model.comparison=[abs_diff,l2,residual]", "ensemble.max_rounds=5")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(f"pair study: {time.perf_counter() - start:.1f} s")
    run_dir = tmp_path / "runs" / "digits"
    report = json.loads((run_dir / "report.json").read_text())
    assert report["task"] == "pair_binary" and len(report["jobs"]) == 2
    meta = json.loads((run_dir / "ensemble" / "model" / "meta.json").read_text())
    assert all(job["comparison"] == ["abs_diff", "l2", "residual"] for job in meta["jobs"])
    index = read_index(tmp_path / "data" / "pairs")
    pairs = {ref.sample_id: [np.asarray(Image.open(io.BytesIO(read_image(ref, second)))) for second in (False, True)]
             for url in index.urls("test") for ref in shard_samples(url)}  # fmt: skip
    mlflow.set_tracking_uri(report["mlflow"]["tracking_uri"])
    model = mlflow.pyfunc.load_model(report["ensemble_model"]["uri"])
    with np.load(run_dir / "ensemble" / "model_test.npz") as z:
        ids, expected = z["sample_ids"].tolist(), z["probs"]
    probs = model.predict(np.stack([pairs[i] for i in ids]))  # [N, 2, H, W]: each sample a pair
    np.testing.assert_allclose(probs, expected, atol=1e-5)
    labels = model.predict([tuple(pairs[i]) for i in ids], params={"output": "labels"})  # or (a, b) tuples
    assert labels.shape == (len(ids),) and set(labels.tolist()) <= {0, 1}
    for side, folder in enumerate(("first", "second")):  # `distrain predict` of two folders matched by file name
        (tmp_path / folder).mkdir()
        for i in ids:
            Image.fromarray(pairs[i][side]).save(tmp_path / folder / f"{i}.png")
    args = ["predict", "--run-dir", str(run_dir), "--images", str(tmp_path / "first"), "--second-images",
            str(tmp_path / "second"), "--out", str(tmp_path / "preds.csv")]  # fmt: skip
    assert cli.main(args) == 0
    with open(tmp_path / "preds.csv") as f:
        rows = {r["image"]: [float(r["p_0"]), float(r["p_1"])] for r in csv.DictReader(f)}
    np.testing.assert_allclose([rows[f"{i}.png"] for i in ids], expected, atol=2e-6)
    shards = ["predict", "--run-dir", str(run_dir), "--shards", str(out), "--out", str(tmp_path / "shards.csv")]
    assert cli.main(shards) == 0  # both images of each sample read from the shards
    with open(tmp_path / "shards.csv") as f:
        rows = {r["image"]: [float(r["p_0"]), float(r["p_1"])] for r in csv.DictReader(f)}
    np.testing.assert_allclose([rows[i] for i in ids], expected, atol=2e-6)
    (tmp_path / "second" / f"{ids[0]}.png").unlink()
    capsys.readouterr()
    assert cli.main(args) == 2
    assert f"{ids[0]}.png: no image of the same name in" in capsys.readouterr().err
