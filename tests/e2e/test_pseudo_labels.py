"""End to end: a pseudo-label round on digits with part of the labelled pool hidden as unlabelled images, and the
refusals of an unlabelled folder that does not fit."""

import json

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from distrain.study.folds import FoldManifest

from conftest import REPO, cli_in, in_process_steps

pytestmark = pytest.mark.slow

FIRST_ROUND = ["experiment=pl", "data.source=shards", "data.root=data/lab", "data.image_size=16", "cv.folds=3",
               "cv.seeds=[1]", "train.epochs=10", "train.batch_size=32", "train.progress=false",
               "ensemble.stacking=false"]  # fmt: skip


@pytest.fixture(scope="module")
def rounds(tmp_path_factory):
    """400 labelled digits (a fifth of them the holdout) and 400 more with their labels hidden: the first round,
    then `distrain pseudo-label` at threshold 0.7."""
    from sklearn.datasets import load_digits

    cwd = tmp_path_factory.mktemp("pseudo")
    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.images))
    x = (digits.images * 16).clip(0, 255).astype(np.uint8)
    np.savez(cwd / "labelled.npz", x=x[order[:400]], y=digits.target[order[:400]])
    np.savez(cwd / "hidden.npz", x=x[order[400:800]], y=digits.target[order[400:800]])
    rgb = np.repeat(x[order[800:900], :, :, None], 3, axis=3)
    rgb[..., 0] = 255 - rgb[..., 0]  # not grey: packed as 3 channels
    np.savez(cwd / "colour.npz", x=rgb, y=digits.target[order[800:900]])
    steps = [("cli", "data", "pack", "--npz", f"{name}.npz", "--images", "x", "--out", f"data/{out}")
             for name, out in (("labelled", "lab"), ("hidden", "unl"), ("colour", "rgb"))]  # fmt: skip
    steps += [
        ("run", "--config", "configs/digits.yaml", *FIRST_ROUND),
        (
            "cli",
            "pseudo-label",
            "--run-dir",
            "runs/pl",
            "--unlabelled",
            "data/unl",
            "--threshold",
            "0.7",
            "--soft",
            "experiment=pl-soft",
        ),
        ("cli", "pseudo-label", "--run-dir", "runs/pl", "--unlabelled", "data/unl", "--threshold", "0.7"),
    ]
    (cwd / "configs").mkdir()
    (cwd / "configs" / "digits.yaml").write_text((REPO / "configs" / "digits.yaml").read_text())
    return cwd, in_process_steps(cwd, steps)


def test_a_round_trains_on_the_pseudo_labelled_images_and_reports_its_effect(rounds):
    cwd, proc = rounds
    report = json.loads((cwd / "runs" / "pl-pseudo" / "pseudo.json").read_text())
    first = json.loads((cwd / "runs" / "pl" / "report.json").read_text())
    second = json.loads((cwd / "runs" / "pl-pseudo" / "report.json").read_text())
    rows = {r["ensemble"]: r for r in report["ensembles"]}
    best = rows["best_single"]
    assert best["cv_before"] == first["ensembles"]["best_single"]["cv"]
    assert best["cv_after"] == second["ensembles"]["best_single"]["cv"]
    assert best["cv_gain"] == pytest.approx(best["cv_after"] - best["cv_before"])
    # the same labelled folds score both rounds
    assert (cwd / "runs" / "pl" / "folds.json").read_text() == (cwd / "runs" / "pl-pseudo" / "folds.json").read_text()
    for fold in report["folds"]:  # each fold took confident images, labelled far better than chance (0.1)
        assert 0 < fold["pseudo_labelled"] <= fold["of"] == 400 and fold["accuracy"] > 0.8, fold
    assert "pseudo-labelled" in proc.stdout and "gain" in proc.stdout
    run = MlflowClient(second["mlflow"]["tracking_uri"]).get_run(second["mlflow"]["parent_run_id"])
    assert run.data.metrics["pseudo_gain_best_single_cv"] == pytest.approx(best["cv_gain"])


def test_fold_m_takes_fold_m_models_labels_and_validates_on_labelled_fold_m_only(rounds):
    cwd, _ = rounds
    with np.load(cwd / "runs" / "pl-pseudo" / "pseudo_labels.npz") as z:
        ids, fold_probs = [str(s) for s in z["sample_ids"]], z["fold_probs"]
    folds = FoldManifest.from_json((cwd / "runs" / "pl-pseudo" / "folds.json").read_text()).fold_of_sample
    assert not set(ids) & set(folds)  # no unlabelled image is in a validation fold
    assert len(ids) == 400 and fold_probs.shape == (3, 400, 10)
    # the folds' ensembles are different models: their labels differ somewhere
    assert (fold_probs.argmax(axis=2)[0] != fold_probs.argmax(axis=2)[1]).any()
    for fold in range(3):
        with np.load(cwd / "runs" / "pl-pseudo" / "jobs" / f"test_resnet-s1-f{fold}" / "oof.npz") as z:
            assert sorted(map(str, z["sample_ids"])) == sorted(s for s, f in folds.items() if f == fold)


@pytest.mark.parametrize(
    "folder, message",
    [
        ("nowhere", "data.unlabelled: nowhere is not a directory"),
        ("data/lab", "data.unlabelled: data/lab is data.root itself"),
        ("data/rgb", "data.unlabelled: data/rgb has 3-channel images"),
        ("runs", "data.unlabelled: runs holds no .tar shards"),
    ],
)
def test_an_unlabelled_folder_that_does_not_fit_is_refused_in_one_line(rounds, capsys, monkeypatch, folder, message):
    cwd, _ = rounds
    proc = cli_in(capsys, monkeypatch, cwd, "pseudo-label", "--run-dir", "runs/pl", "--unlabelled", folder)
    assert proc.returncode == 2 and message in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr


def test_a_copy_of_the_labelled_data_is_refused(rounds, capsys, monkeypatch, tmp_path):
    import shutil

    cwd, _ = rounds
    shutil.copytree(cwd / "data" / "lab", tmp_path / "copy")
    copy = str(tmp_path / "copy")
    proc = cli_in(capsys, monkeypatch, cwd, "pseudo-label", "--run-dir", "runs/pl", "--unlabelled", copy)
    assert proc.returncode == 2 and "shares 400 sample id(s) with data.root" in proc.stderr, proc.stderr


def test_the_main_job_refuses_a_wrong_data_unlabelled_before_any_job(rounds, capsys, monkeypatch,
                                                                     fresh_accelerate_state):  # fmt: skip
    from conftest import run_in

    cwd, _ = rounds
    proc = run_in(capsys, monkeypatch, cwd, "--config", "configs/digits.yaml", *FIRST_ROUND, "experiment=pl2",
                  "data.unlabelled=data/rgb")  # fmt: skip
    assert proc.returncode == 2 and "data.unlabelled: data/rgb has 3-channel images" in proc.stderr, proc.stderr
    assert not (cwd / "runs" / "pl2" / "jobs").exists()


def test_a_soft_round_takes_the_same_images_and_learns_their_rows(rounds):
    cwd, _ = rounds
    hard = json.loads((cwd / "runs" / "pl-pseudo" / "pseudo.json").read_text())
    soft = json.loads((cwd / "runs" / "pl-soft" / "pseudo.json").read_text())
    assert soft["soft"] and not hard["soft"]
    assert [f["pseudo_labelled"] for f in soft["folds"]] == [f["pseudo_labelled"] for f in hard["folds"]]
    for fold in range(3):  # the same samples, other targets: other weights, other OOF rows
        with np.load(cwd / "runs" / "pl-pseudo" / "jobs" / f"test_resnet-s1-f{fold}" / "oof.npz") as a:
            with np.load(cwd / "runs" / "pl-soft" / "jobs" / f"test_resnet-s1-f{fold}" / "oof.npz") as b:
                assert a["sample_ids"].tolist() == b["sample_ids"].tolist()
                assert np.abs(a["probs"] - b["probs"]).max() > 1e-3
