"""End to end: a network of the user's own (`model.names: [factories:tiny]`, a factory in tests/factories.py with a
`model.factory_args` entry, dropout and gradient checkpointing) trained as the main job, registered, and served by
the MLflow pyfunc model, which rebuilds it by importing the factory; a factory path that does not import is refused
before any work."""

import json
import os
import time

import numpy as np
import pytest

from conftest import REPO, distrain_run, e2e_timeout, holdout_images, last_line, run_in

pytestmark = pytest.mark.slow

FACTORY_ENV = {"PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
"""The factory's module must import where jobs run and where the model is served: tests/ on the path."""
TINY = ["cv.folds=2", "cv.seeds=[1]", "train.epochs=1", "data.image_size=16", "train.progress=false",
        "ensemble.max_rounds=5"]  # fmt: skip


def test_a_factory_network_trains_registers_and_serves_its_test_predictions(tmp_path):
    import mlflow
    import mlflow.pyfunc

    start = time.perf_counter()
    proc = distrain_run(tmp_path, "model.names=[factories:tiny]", "model.factory_args={'factories:tiny': {width: 12}}",
                        "model.drop_rate=0.1", "model.grad_checkpointing=true", *TINY, env=FACTORY_ENV,
                        timeout=e2e_timeout(300))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(f"factory study: {time.perf_counter() - start:.1f} s")
    assert "gradient checkpointing (stages)" in proc.stdout + proc.stderr  # no timm hook: its top-level stages
    run_dir = tmp_path / "runs" / "digits"
    report = json.loads((run_dir / "report.json").read_text())
    assert {j["model"] for j in report["jobs"]} == {"factories:tiny"} and len(report["jobs"]) == 2
    meta = json.loads((run_dir / "ensemble" / "model" / "meta.json").read_text())
    for job in meta["jobs"]:  # what serving rebuilds each network with
        assert job["model"] == "factories:tiny"
        assert job["model_args"] == {"drop_rate": 0.1, "drop_path_rate": 0.0, "factory_args": {"width": 12}}
    mlflow.set_tracking_uri(report["mlflow"]["tracking_uri"])
    model = mlflow.pyfunc.load_model(report["ensemble_model"]["uri"])  # imports `factories` (on sys.path in tests)
    ids, images = holdout_images(tmp_path)
    probs = model.predict(images)
    with np.load(run_dir / "ensemble" / "model_test.npz") as z:
        assert z["sample_ids"].tolist() == ids
        np.testing.assert_allclose(probs, z["probs"], atol=1e-5)


def test_a_factory_path_that_does_not_import_exits_2_in_one_line_before_any_work(
    tmp_path, capsys, monkeypatch, fresh_accelerate_state
):
    proc = run_in(capsys, monkeypatch, tmp_path, "model.names=[factories:nope]", *TINY)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert last_line(proc.stderr) == (
        "distrain: error: model.names: 'factories:nope' does not import (module 'factories' has no attribute 'nope')"
    )
    assert "Traceback" not in proc.stderr and not (tmp_path / "runs").exists() and not (tmp_path / "data").exists()
