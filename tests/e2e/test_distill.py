"""End to end: `distrain distill` on a study whose labels were drawn at random (nothing to learn), so that any
information reaching a student's validation fold through its soft targets would lift its CV above chance."""

import json

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from distrain.data.index import read_index
from distrain.study.folds import FoldManifest
from distrain.study.results import load_predictions

from conftest import in_process_steps

pytestmark = pytest.mark.slow

CLASSES = 4
FOLDS = 5
CONFIG = f"""experiment: perm
data: {{source: shards, root: data/perm, image_size: 16, interpolation: bilinear, crop_pct: 1.0, mean: [0.5],
        std: [0.5], num_classes: {CLASSES}, num_workers: 0}}
augment: {{enabled: false}}
cv: {{folds: {FOLDS}, seeds: [42]}}
model: {{names: [test_resnet]}}
optim: {{lr: 3.0e-3, weight_decay: 0.0, warmup_fraction: 0.0, schedule: constant}}
train: {{epochs: 12, batch_size: 16, metric: accuracy, progress: false}}
ensemble: {{stacking: false}}
"""
"""Un-augmented 16 px digits, 12 epochs at a constant LR: enough for test_resnet to memorise random labels."""


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    """300 digits with random labels (4 classes): the teacher study, then `distrain distill` into test_resnet."""
    from sklearn.datasets import load_digits

    cwd = tmp_path_factory.mktemp("distill")
    digits, rng = load_digits(), np.random.default_rng(0)
    pick = rng.choice(len(digits.images), 300, replace=False)
    x = (digits.images[pick] * 16).clip(0, 255).astype(np.uint8)
    np.savez(cwd / "perm.npz", x=x, y=rng.integers(0, CLASSES, size=300))
    (cwd / "perm.yaml").write_text(CONFIG)
    steps = [
        ("cli", "data", "pack", "--npz", "perm.npz", "--images", "x", "--out", "data/perm"),
        ("run", "--config", "perm.yaml"),
        ("cli", "distill", "--run-dir", "runs/perm", "--student", "test_resnet", "--no-hard-baseline"),
    ]
    return cwd, in_process_steps(cwd, steps)


def test_soft_targets_come_only_from_models_that_never_trained_on_the_sample_or_the_students_fold(distilled):
    cwd, _ = distilled
    teacher = cwd / "runs" / "perm"
    folds = FoldManifest.from_json((teacher / "folds.json").read_text()).fold_of_sample
    with np.load(cwd / "runs" / "perm-student" / "soft_targets.npz") as z:
        ids, oof, fold_probs = [str(s) for s in z["sample_ids"]], z["probs"], z["fold_probs"]
    holdout = set(read_index(cwd / "data" / "perm").split_ids("test"))
    assert set(ids) == set(folds) and not set(ids) & holdout  # every CV sample, no holdout sample
    row = {s: i for i, s in enumerate(ids)}
    for fold in range(FOLDS):
        job = load_predictions(teacher / "jobs" / f"test_resnet-s42-f{fold}" / "oof.npz")
        # the teacher's fold-m job validated on fold m (so trained on the others): its rows are fold m's OOF rows
        assert sorted(job.sample_ids) == sorted(s for s, f in folds.items() if f == fold)
        rows = [row[s] for s in job.sample_ids]
        np.testing.assert_allclose(oof[rows], job.probs, atol=1e-6)
        # a fold-m student's targets are that job's predictions (the same rows on fold m, predicted again by the
        # served network): a model that never saw fold m, the student's validation fold
        np.testing.assert_allclose(fold_probs[fold][rows], job.probs, atol=1e-5)
        others = [row[s] for s, f in folds.items() if f != fold]
        assert np.abs(fold_probs[fold][others] - oof[others]).max() > 0.05  # not the OOF rows there


def test_with_random_labels_the_students_honest_cv_stays_at_chance_while_it_memorises(distilled):
    cwd, _ = distilled
    teacher = json.loads((cwd / "runs" / "perm" / "report.json").read_text())
    student = json.loads((cwd / "runs" / "perm-student" / "report.json").read_text())
    chance = 1 / CLASSES
    # the pooled OOF accuracy of best epochs: chance plus the best-of-12-epochs selection (the teacher's own CV
    # shows its size); OOF rows as fold targets measured 0.396 here, fold m's teachers' rows 0.31
    assert student["ensembles"]["best_single"]["cv"] < chance + 0.12
    assert student["ensembles"]["best_single"]["cv"] < teacher["ensembles"]["best_single"]["cv"] + 0.06
    # ...while the same jobs learned their training folds' labels: a leak of fold m's labels would have been used
    memorised = []
    for fold in range(FOLDS):
        history = json.loads((cwd / "runs" / "perm-student" / "jobs" / f"test_resnet-s42-f{fold}" / "metrics.json")
                             .read_text())  # fmt: skip
        memorised.append(max(r["train_eval_accuracy"] for r in history))
    assert np.mean(memorised) > 0.6, memorised


def test_the_student_is_one_registered_network_that_serves_what_it_was_scored_on(distilled):
    import mlflow.pyfunc

    from distrain.serving.predictor import shard_inputs

    cwd, proc = distilled
    report = json.loads((cwd / "runs" / "perm-student" / "distill.json").read_text())
    rows = {r["name"]: r for r in report["rows"]}
    assert set(rows) == {"teacher", "best_single", "student"}
    assert rows["teacher"]["networks"] == FOLDS and rows["student"]["networks"] == 1
    assert rows["student"]["parameters"] * FOLDS == rows["teacher"]["parameters"]
    assert all(r["samples_per_s"] > 0 for r in rows.values())
    assert "student" in proc.stdout and "samples/s" in proc.stdout
    uri = json.loads((cwd / "runs" / "perm-student" / "report.json").read_text())["mlflow"]["tracking_uri"]
    assert uri.startswith("sqlite:") and "runs/mlflow.db" in uri  # the default store beside the run directories
    client = MlflowClient(uri)
    version = client.get_model_version("distrain-perm-student", report["student_model"]["version"])
    assert version.tags["distrain.distilled_from"] == "perm" and version.tags["distrain.job"] == "test_resnet-s42-whole"
    run = client.get_run(version.run_id)
    assert run.data.metrics["distill_student_cv"] == pytest.approx(rows["student"]["cv"])
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model(f"models:/distrain-perm-student/{version.version}")
    index = read_index(cwd / "data" / "perm")
    ids, samples = shard_inputs(index.urls("test"))
    served = model.predict(np.stack([np.asarray(im) for im in samples]))
    job = load_predictions(cwd / "runs" / "perm-student" / "jobs" / "test_resnet-s42-whole" / "test.npz")
    assert job.sample_ids == ids
    np.testing.assert_allclose(served, job.probs, atol=1e-5)


def test_distill_refuses_bad_requests_in_one_line(distilled, capsys, monkeypatch):
    from conftest import cli_in

    cwd, _ = distilled
    for argv, message in [
        (["--run-dir", "nowhere", "--student", "test_resnet"], "not a distrain run directory"),
        (["--run-dir", "runs/perm", "--student", "resnet_does_not_exist"], "unknown timm model"),
        (["--run-dir", "runs/perm", "--student", "test_resnet", "--alpha", "2"], "distill.alpha: invalid value 2.0"),
    ]:
        proc = cli_in(capsys, monkeypatch, cwd, "distill", *argv)
        assert proc.returncode == 2 and message in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
