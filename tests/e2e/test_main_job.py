"""End to end: the README's main job on the default config, its DDP twin, MLflow, and bad input."""

import json
import time
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from distrain.config import yaml_load

from conftest import REPO, cli_in, distrain_run, e2e_timeout, holdout_images, last_line, run_in

DIGITS = REPO / "configs" / "digits.yaml"

pytestmark = pytest.mark.slow


_DEFAULT_RUN_FAILURE: list[str] = []


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """The default config, unchanged, as one CPU process (the README's first command, minus the install).
    A failure is reported once; the tests that need the run then fail at once instead of re-running it."""
    if _DEFAULT_RUN_FAILURE:
        pytest.fail(_DEFAULT_RUN_FAILURE[0])
    cwd = tmp_path_factory.mktemp("default")
    start = time.perf_counter()
    try:
        proc = distrain_run(cwd, timeout=e2e_timeout(1800))
    except Exception as e:
        _DEFAULT_RUN_FAILURE.append(f"default run did not finish: {e}")
        raise
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        _DEFAULT_RUN_FAILURE.append(f"default run failed: {proc.stderr[-3000:]}")
        pytest.fail(_DEFAULT_RUN_FAILURE[0])
    report = json.loads((cwd / "runs" / "digits" / "report.json").read_text())
    print(f"default config: {seconds:.0f} s, test fold average {report['test']['fold_average']:.4f}")
    return cwd, report, seconds, proc


def test_default_config_meets_the_bar(default_run):
    cwd, report, seconds, proc = default_run
    assert seconds < 600
    folds = {j["fold"] for j in report["jobs"]}
    seeds = {j["seed"] for j in report["jobs"]}
    assert len(folds) >= 5 and len(seeds) >= 2 and len(report["jobs"]) == len(folds) * len(seeds)
    assert report["test"]["fold_average"] >= 0.97
    # the contract's keys and types
    assert set(report) >= {"experiment", "metric", "jobs", "cv", "test", "mlflow"}
    assert report["experiment"] == "digits" and report["metric"] == "accuracy"
    for j in report["jobs"]:
        assert (
            j["status"] == "done"
            and isinstance(j["val_score"], float)
            and j["id"] == f"{j['model']}-s{j['seed']}-f{j['fold']}"
        )
    scores = [j["val_score"] for j in report["jobs"]]
    assert report["cv"]["mean"] == pytest.approx(np.mean(scores))
    assert report["cv"]["std"] == pytest.approx(np.std(scores, ddof=1))
    assert "CV mean ± std" in proc.stdout and "holdout test, fold-averaged" in proc.stdout


# Files a run directory gained on purpose since the snapshot in default_run_layout.json was taken (from
# the last version before the redesign, 1ac28d4): the log that library warnings go to.
ADDED_FILES = {"distrain.log": 1, "ensemble/model_test.npz": 1}  # and the registered ensemble's test probabilities
# mlflow.json (one study-run marker, overwritten) became one record per run, per tracking store, never overwritten
ADDED_FILES |= {"mlflow/STORE/study-000001.json": 1, "mlflow/STORE/job-JOB-000001.json": 10}
REMOVED_FILES = {"mlflow.json"}
ADDED_REPORT_KEYS = {  # since the redesign's layout; report.json only gains keys
    "task": "str",
    "ensembles": {"selection": {"cv": "float", "test": "float"}},
    "ensemble_details": {"excluded": [], "best_single_fold_columns": {str(k): "str" for k in range(5)},
                         "selection": {"fold_weights": {str(k): ["float"] for k in range(5)}, "rounds": "int",
                                       "weights": {"test_resnet-s42": "float", "test_resnet-s43": "float"},
                                       "pinned": []}},
    "ensemble_model": {"ensemble": "str"},
}  # fmt: skip
ADDED_JOB_KEYS = {"best_source": "str"}  # raw weights or their EMA


def _with_added(tree: dict, added: dict) -> dict:
    """`tree` with the keys of `added` merged in at every depth."""
    merged = dict(tree)
    for key, value in added.items():
        merged[key] = _with_added(merged[key], value) if isinstance(value, dict) and key in merged else value
    return dict(sorted(merged.items()))


def test_run_directory_and_report_keep_their_layout(default_run):
    """The redesign changed no file of a run directory and no key of report.json (keys were added since, named
    above)."""
    from layout import layout

    cwd, *_ = default_run
    before = json.loads((Path(__file__).parent / "default_run_layout.json").read_text())
    now = layout(cwd / "runs" / "digits")
    expected = _with_added(before["report"], ADDED_REPORT_KEYS)
    expected["jobs"] = [{**job, **ADDED_JOB_KEYS} for job in before["report"]["jobs"]]
    assert now["report"] == expected
    kept = {k: v for k, v in before["files"].items() if k not in REMOVED_FILES}
    assert now["files"] == dict(sorted({**kept, **ADDED_FILES}.items()))


def test_library_noise_goes_to_the_log_not_the_terminal(default_run):
    cwd, _, _, proc = default_run
    terminal = proc.stdout + proc.stderr
    log = (cwd / "runs" / "digits" / "distrain.log").read_text()
    for notice in ("Successfully registered model", "Passing a Python object as `python_model`",
                   "Creating initial MLflow database tables"):  # fmt: skip
        assert notice not in terminal and notice in log, notice
    assert "Downloading artifacts" not in terminal and "Add type hints" not in terminal
    assert "\r" not in proc.stderr  # no progress-bar redraws in a log (not a terminal here)


def oof_coverage(run_dir: Path) -> dict:
    """sample ids per (model, seed) over all folds' oof.npz files."""
    cover = {}
    for f in sorted((run_dir / "jobs").glob("*/oof.npz")):
        done = json.loads((f.parent / "done.json").read_text())
        with np.load(f) as z:
            cover.setdefault((done["model"], done["seed"]), []).extend(z["sample_ids"].tolist())
    return cover


def cv_ids(cwd: Path) -> set:
    index = json.loads((cwd / "data" / "digits" / "index.json").read_text())
    return {s["sample_id"] for s in index["samples"] if s["split"] == "cv"}


def test_oof_covers_every_cv_sample_once_per_model_seed(default_run):
    cwd, report, *_ = default_run
    cover = oof_coverage(cwd / "runs" / "digits")
    assert len(cover) == 2
    for ids in cover.values():
        assert len(ids) == len(set(ids)) == len(cv_ids(cwd))
        assert set(ids) == cv_ids(cwd)


def test_mlflow_tree_reads_back(default_run):
    cwd, report, *_ = default_run
    info = report["mlflow"]
    assert info["tracking_uri"].startswith("sqlite:///") and str(cwd) in info["tracking_uri"]
    client = MlflowClient(info["tracking_uri"])
    assert client.get_experiment(info["experiment_id"]).name == "digits"
    parent = client.get_run(info["parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["test_accuracy_fold_average"] == pytest.approx(report["test"]["fold_average"])
    children = client.search_runs(
        [info["experiment_id"]],
        filter_string=f"tags.mlflow.parentRunId = '{info['parent_run_id']}' and tags.`distrain.kind` = 'job'",
    )
    assert sorted(c.info.run_name for c in children) == sorted(j["id"] for j in report["jobs"])
    child = next(c for c in children if c.info.run_name == report["jobs"][0]["id"])
    assert child.data.tags["model"] == report["jobs"][0]["model"] and child.data.tags["fold"] == "0"
    default = yaml_load((REPO / "configs" / "digits.yaml").read_text())
    assert child.data.params["train.epochs"] == str(default["train"]["epochs"])
    assert child.data.params["cv.folds"] == str(default["cv"]["folds"])
    for metric in ("train_loss", "val_loss", "val_accuracy", "lr", "grad_norm", "train_val_gap", "samples_per_s"):
        assert len(client.get_metric_history(child.info.run_id, metric)) == default["train"]["epochs"], metric
    artifacts = {a.path for a in client.list_artifacts(child.info.run_id, "checkpoint")} | {
        a.path for a in client.list_artifacts(child.info.run_id, "predictions")
    }
    assert {"checkpoint/best.pt", "predictions/oof.npz"} <= artifacts
    assert "config.yaml" in {a.path for a in client.list_artifacts(parent.info.run_id)}


def test_rerun_on_finished_run_dir_trains_nothing(default_run, capsys, monkeypatch, fresh_accelerate_state):
    cwd, report, seconds, _ = default_run
    start = time.perf_counter()
    proc = run_in(capsys, monkeypatch, cwd, "--config", str(DIGITS))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "distrain: job" not in proc.stdout and time.perf_counter() - start < seconds / 2
    assert "distrain: nothing to train: all 10 jobs of runs/digits are done" in proc.stdout  # says why
    assert "CV mean ± std" in proc.stdout and "stacking" in proc.stdout  # and shows the report again
    again = json.loads((cwd / "runs" / "digits" / "report.json").read_text())
    assert again["jobs"] == report["jobs"] and again["test"] == report["test"]


def test_changed_config_on_existing_run_dir_is_refused(default_run, capsys, monkeypatch, fresh_accelerate_state):
    cwd, *_ = default_run
    proc = run_in(capsys, monkeypatch, cwd, "--config", str(DIGITS), "train.epochs=3")
    assert proc.returncode == 2
    assert "was run with another config (train.epochs: 8 -> 3)" in last_line(proc.stderr)


def test_ddp_two_processes_same_manifest_and_full_oof(default_run, tmp_path):
    cwd, report, *_ = default_run
    proc = distrain_run(tmp_path, "train.epochs=1", processes=2, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout
    hash_1 = json.loads((cwd / "runs" / "digits" / "folds.json").read_text())["hash"]
    hash_2 = json.loads((tmp_path / "runs" / "digits" / "folds.json").read_text())["hash"]
    assert hash_1 == hash_2
    cover = oof_coverage(tmp_path / "runs" / "digits")
    assert len(cover) == 2
    for ids in cover.values():
        assert len(ids) == len(set(ids)) and set(ids) == cv_ids(tmp_path)
    ddp_report = json.loads((tmp_path / "runs" / "digits" / "report.json").read_text())
    assert ddp_report["mlflow"]["parent_run_id"] and len(ddp_report["jobs"]) == len(report["jobs"])


@pytest.mark.parametrize(
    "setup, overrides, message",
    [
        ("malformed", [], "malformed YAML at line"),
        (None, ["data.source=shards", "data.root=no/such/dir"], "data path no/such/dir: no index.json"),
        (None, ["model.names=[resnet_nope]"], "model.names: unknown timm model 'resnet_nope'"),
        (None, ["data.num_classes=5"], "data.num_classes: invalid value 5 (expected 10 for data.source: digits)"),
        (None, ["train.precision=fp16"], "train.precision: 'fp16' needs a CUDA GPU"),
        (None, ["augment.auto_augment=rand-m9-foo"], "augment.auto_augment: timm cannot build policy 'rand-m9-foo'"),
        (None, ["data.mean=[0.5,0.5]"], "data.mean: invalid value [0.5, 0.5]"),
        (None, ["train.loss=bce"], "train.loss: invalid value 'bce' (expected a multiclass loss"),
    ],
)
def test_bad_input_exits_nonzero_with_one_line_and_leaves_no_work(
    tmp_path, setup, overrides, message, monkeypatch, capsys, fresh_accelerate_state
):
    """The malformed YAML through the script itself; the others through its `main` in this process (the same code,
    without 5 s of imports per case)."""
    config = REPO / "configs" / "digits.yaml"
    if setup == "malformed":
        config = tmp_path / "bad.yaml"
        config.write_text("train:\n  epochs: [1,\n")
        proc = distrain_run(tmp_path, *overrides, config=config, timeout=300)
    else:
        proc = run_in(capsys, monkeypatch, tmp_path, "--config", str(config), *overrides)
    assert proc.returncode == 2
    assert message in last_line(proc.stderr) and last_line(proc.stderr).startswith("distrain: error: ")
    assert "Traceback" not in proc.stderr
    run_dir = tmp_path / "runs" / "digits"
    assert not (run_dir / "report.json").exists() and not list(run_dir.glob("jobs/*/done.json"))
    assert not run_dir.exists()  # refused before the run directory was made


def test_report_has_ensembles_next_to_single_models(default_run):
    cwd, report, _, proc = default_run
    names = {
        "best_single",
        "mean_single",
        "fold_average",
        "soft_vote",
        "hard_vote",
        "weighted_vote",
        "selection",
        "k_of_n_vote",
        "stacking",
    }
    assert set(report["ensembles"]) == names
    for s in report["ensembles"].values():
        assert 0.9 <= s["cv"] <= 1.0 and 0.9 <= s["test"] <= 1.0
    assert report["ensembles"]["fold_average"]["test"] == report["test"]["fold_average"]
    assert "stacking" in proc.stdout and "soft_vote" in proc.stdout


def test_registered_pyfunc_model_is_the_best_ensemble_and_reproduces_its_test_predictions(default_run):
    import mlflow
    import mlflow.pyfunc

    cwd, report, *_ = default_run
    mlflow.set_tracking_uri(report["mlflow"]["tracking_uri"])
    model = mlflow.pyfunc.load_model(report["ensemble_model"]["uri"])
    ids, images = holdout_images(cwd)
    probs = model.predict(images)
    with np.load(cwd / "runs" / "digits" / "ensemble" / "model_test.npz") as z:
        assert z["sample_ids"].tolist() == ids
        np.testing.assert_allclose(probs, z["probs"], atol=1e-5)
    labels = np.load(next((cwd / "runs" / "digits" / "jobs").glob("*/test.npz")))["labels"]
    chosen = report["ensemble_model"]["ensemble"]
    assert (probs.argmax(1) == labels).mean() == pytest.approx(report["ensembles"][chosen]["test"])
    registrable = ("best_single", "soft_vote", "weighted_vote", "selection", "stacking")
    assert report["ensembles"][chosen]["cv"] == max(report["ensembles"][n]["cv"] for n in registrable)


def test_mlflow_has_ensemble_runs_and_review_artifacts(default_run):
    cwd, report, *_ = default_run
    info = report["mlflow"]
    client = MlflowClient(info["tracking_uri"])
    children = client.search_runs(
        [info["experiment_id"]],
        filter_string=f"tags.mlflow.parentRunId = '{info['parent_run_id']}' and tags.`distrain.kind` = 'ensemble'",
    )
    by_name = {c.info.run_name: c for c in children}
    assert set(by_name) == {"voting", "stacking"}
    assert by_name["stacking"].data.metrics["stacking_cv"] == pytest.approx(report["ensembles"]["stacking"]["cv"])
    assert by_name["voting"].data.metrics["soft_vote_test"] == pytest.approx(report["ensembles"]["soft_vote"]["test"])
    review = {a.path for a in client.list_artifacts(info["parent_run_id"], "review")}
    assert {"review/scores.png", "review/confusion.png", "review/calibration.png", "review/summary.md"} <= review
    versions = client.search_model_versions(f"name = '{report['ensemble_model']['name']}'")
    assert str(report["ensemble_model"]["version"]) in {str(v.version) for v in versions}
    champion = client.get_model_version_by_alias(report["ensemble_model"]["name"], "champion")
    assert (
        str(champion.version) == str(report["ensemble_model"]["version"])
        and champion.run_id == by_name["stacking"].info.run_id
    )
    chosen = report["ensemble_model"]["ensemble"]
    assert champion.tags["distrain.ensemble"] == chosen
    assert float(champion.tags["cv_accuracy"]) == pytest.approx(report["ensembles"][chosen]["cv"], abs=1e-6)


def test_stacking_off_still_registers_the_named_ensemble_as_the_new_champion(
    default_run, tmp_path, capsys, monkeypatch
):
    """Registration does not depend on stacking: aggregating a copy of the finished run again with stacking off
    and `ensemble.register=soft_vote` registers soft_vote (a new version, on the voting run) as `champion`, and
    the served model reproduces the soft vote's holdout probabilities."""
    import shutil

    import mlflow.pyfunc

    cwd, report, *_ = default_run
    shutil.copytree(cwd / "runs", tmp_path / "runs")
    (tmp_path / "data").symlink_to(cwd / "data")
    args = ["aggregate", "--run-dir", "runs/digits", "ensemble.stacking=false", "ensemble.register=soft_vote"]
    proc = cli_in(capsys, monkeypatch, tmp_path, *args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    again = json.loads((tmp_path / "runs" / "digits" / "report.json").read_text())
    assert "stacking" not in again["ensembles"] and again["ensemble_model"]["ensemble"] == "soft_vote"
    info, name = again["mlflow"], again["ensemble_model"]["name"]
    client = MlflowClient(info["tracking_uri"])
    champion = client.get_model_version_by_alias(name, "champion")
    assert str(champion.version) == str(again["ensemble_model"]["version"])
    assert int(champion.version) > int(report["ensemble_model"]["version"])  # the copied store held the first
    assert champion.tags["distrain.ensemble"] == "soft_vote"
    assert client.get_run(champion.run_id).info.run_name == "voting"
    mlflow.set_tracking_uri(info["tracking_uri"])
    ids, images = holdout_images(tmp_path)
    probs = mlflow.pyfunc.load_model(again["ensemble_model"]["uri"]).predict(images)
    with np.load(tmp_path / "runs" / "digits" / "ensemble" / "model_test.npz") as z:
        assert z["sample_ids"].tolist() == ids
        np.testing.assert_allclose(probs, z["probs"], atol=1e-5)


def test_ensemble_command_reruns_without_training(default_run, capsys, monkeypatch):
    cwd, report, *_ = default_run
    proc = cli_in(capsys, monkeypatch, cwd, "ensemble", "--run-dir", "runs/digits")
    assert proc.returncode == 0, proc.stderr[-2000:]
    again = json.loads((cwd / "runs" / "digits" / "report.json").read_text())
    assert again["ensembles"] == report["ensembles"]  # deterministic, no training
    assert not any((cwd / "runs" / "digits" / "jobs").glob("*/.*.tmp"))


def test_missing_oof_rows_are_named_or_left_out(default_run, tmp_path, capsys, monkeypatch):
    import shutil

    from distrain.study.results import file_digest

    cwd, *_ = default_run
    shutil.copytree(cwd / "runs", tmp_path / "runs")
    shutil.copytree(cwd / "data", tmp_path / "data")
    # the copy has another run directory path and store URI: it gets a study run of its own, found in no record
    oof = tmp_path / "runs" / "digits" / "jobs" / "test_resnet-s43-f2" / "oof.npz"
    with np.load(oof) as z:
        data = {k: z[k] for k in z.files}
    np.savez(oof, **{k: v[:-3] for k, v in data.items()})
    done_path = oof.parent / "done.json"  # a job that wrote fewer rows, not a damaged file: its digest matches
    done = json.loads(done_path.read_text())
    done["files"]["oof.npz"] = file_digest(oof)
    done_path.write_text(json.dumps(done))
    proc = cli_in(capsys, monkeypatch, tmp_path, "ensemble", "--run-dir", "runs/digits")
    assert proc.returncode == 2
    assert "job test_resnet-s43-f2: OOF has" in last_line(proc.stderr) and "missing e.g." in last_line(proc.stderr)
    proc = cli_in(capsys, monkeypatch, tmp_path, "ensemble", "--run-dir", "runs/digits", "--allow-partial")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rep = json.loads((tmp_path / "runs" / "digits" / "report.json").read_text())
    assert rep["ensemble_details"]["columns"] == ["test_resnet-s42"]
    assert rep["ensemble_details"]["left_out"][0]["column"] == "test_resnet-s43"
    assert "left out: job test_resnet-s43-f2" in proc.stdout


def test_predict_writes_one_row_per_image_with_the_ensembles_probabilities(default_run, tmp_path, capsys, monkeypatch):
    """`distrain predict` on a folder of images of several sizes (the holdout digits at 8x8 among others) and
    on the holdout shards: one row per image; the holdout rows equal the stacking ensemble's test
    probabilities. The registered pyfunc model takes a list of differently sized images too."""
    import csv

    import mlflow.pyfunc
    from PIL import Image

    cwd, report, *_ = default_run
    ids, images = holdout_images(cwd)
    folder = tmp_path / "unlabelled"
    (folder / "holdout").mkdir(parents=True)
    for sid, img in zip(ids, images):
        Image.fromarray(img).save(folder / "holdout" / f"{sid}.png")
    rng = np.random.default_rng(0)
    odd_sizes = [rng.integers(0, 255, size=(h, w), dtype=np.uint8) for h, w in ((13, 20), (40, 50), (64, 9))]
    for k, img in enumerate(odd_sizes):
        Image.fromarray(img).save(folder / f"odd-{k}.png")
    with np.load(cwd / "runs" / "digits" / "ensemble" / "model_test.npz") as z:
        expected = dict(zip(z["sample_ids"].tolist(), z["probs"]))
    for flag, source in (("--images", folder), ("--shards", cwd / "data" / "digits")):
        out = tmp_path / f"preds{flag}.csv"
        proc = cli_in(
            capsys, monkeypatch, cwd, "predict", "--run-dir", "runs/digits", flag, str(source), "--out", str(out)
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        rows = list(csv.DictReader(out.open()))
        assert list(rows[0]) == ["image", "prediction", *(f"p_{c}" for c in range(10))]
        by_id = {Path(r["image"]).stem: r for r in rows}
        if flag == "--images":
            assert len(rows) == len(ids) + len(odd_sizes) and {"odd-0", "odd-1", "odd-2"} <= set(by_id)
        holdout = [s for s in ids if s in by_id]
        assert len(holdout) == len(ids)
        for sid in holdout:
            probs = np.array([float(by_id[sid][f"p_{c}"]) for c in range(10)])
            np.testing.assert_allclose(probs, expected[sid], atol=2e-6)
            assert by_id[sid]["prediction"] == str(int(expected[sid].argmax()))
    mlflow.set_tracking_uri(report["mlflow"]["tracking_uri"])
    model = mlflow.pyfunc.load_model(report["ensemble_model"]["uri"])
    probs = model.predict([images[0], *odd_sizes])
    assert probs.shape == (4, 10)
    np.testing.assert_allclose(probs[0], expected[ids[0]], atol=1e-5)


def _chromium() -> str | None:
    import shutil

    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture
def mlflow_server(default_run):
    """A real `mlflow server` on loopback over the default run's store; stopped afterwards."""
    from conftest import mlflow_server as server

    cwd, report, *_ = default_run
    with server(report["mlflow"]["tracking_uri"], cwd) as url:
        yield url, report, cwd


def test_browser_shows_study_jobs_ensembles_and_a_plot(mlflow_server, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api")
    if _chromium() is None:  # playwright would otherwise look for a browser download of its own
        pytest.skip("Debian's chromium is not installed (.ci/run installs it)")
    url, report, cwd = mlflow_server
    info = report["mlflow"]
    args = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
    ]
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), args=args)
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        # MLflow 3 opens in GenAI mode; training runs live under workflowType=machine_learning
        page.goto(f"{url}/#/experiments/{info['experiment_id']}/runs?workflowType=machine_learning")
        study = page.locator("[role=row]").filter(has_text="digits-study").first
        study.wait_for(timeout=60_000)
        study.locator("[data-component-id*='runnamecellrenderer']").first.click()  # expand nested runs
        for name in ("test_resnet-s42-f0", "test_resnet-s43-f4", "voting", "stacking"):
            page.get_by_role("link", name=name, exact=True).first.wait_for(timeout=30_000)
        page.screenshot(path=str(tmp_path / "runs.png"))
        page.goto(
            f"{url}/#/experiments/{info['experiment_id']}/runs/{info['parent_run_id']}/artifacts/review/scores.png"
        )
        page.get_by_text("review/scores.png").first.wait_for(timeout=60_000)
        plot = page.locator("img[src^='blob:']").first
        plot.wait_for(timeout=60_000)
        page.wait_for_function(
            "img => img.complete && img.naturalWidth > 100", arg=plot.element_handle(), timeout=60_000
        )
        assert plot.evaluate("img => img.naturalWidth") > 100
        page.screenshot(path=str(tmp_path / "plot.png"))
        browser.close()


def test_an_image_that_cannot_be_decoded_stops_the_run_naming_shard_and_sample(tmp_path):
    """Damaged after packing (pack reads only image headers): the job fails on the sample with one line and
    exit 2, not retries that would fail alike; the ledger records the failed attempt."""
    from distrain.data.pack import write_digits
    from distrain.data.shards import shard_samples

    index = write_digits(tmp_path / "digits")
    ref = shard_samples(index.urls("cv")[0])[3]
    with open(ref.url, "r+b") as f:
        f.seek(ref.offset)
        f.write(b"\x89PNG\r\n\x1a\n" + b"\xab" * (ref.size - 8))  # a PNG header over a broken body
    proc = distrain_run(tmp_path, f"data.root={index.root}", "train.epochs=1", timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = last_line(proc.stderr)
    assert line.startswith(f"distrain: error: {ref.url}: sample '{ref.sample_id}': image cannot be decoded"), line
    assert "Traceback" not in proc.stderr
    ends = list((tmp_path / "runs" / "digits").rglob("attempt-*.end"))
    assert len(ends) == 1 and json.loads(ends[0].read_text())["status"] == "failed"


def test_adversarial_validation_finds_the_holdout_alike_and_inverted_digits_apart(default_run, tmp_path, capsys,
                                                                                    monkeypatch):  # fmt: skip
    import io

    from PIL import Image, ImageOps

    from distrain.data.index import read_index
    from distrain.data.shards import read_image, shard_samples

    cwd, report, *_ = default_run
    alike = cli_in(capsys, monkeypatch, cwd, "adversarial", "--run-dir", "runs/digits")
    assert alike.returncode == 0, alike.stderr[-2000:]
    holdout = json.loads((cwd / "runs" / "digits" / "ensemble" / "adversarial-test.json").read_text())
    assert abs(holdout["auc"] - 0.5) <= 0.05 and holdout["n_other"] == 360 and holdout["n_cv"] == 1437
    assert len(holdout["most_unlike_other"]) == 10
    inverted = tmp_path / "inverted"  # the holdout's digits, white on black
    inverted.mkdir()
    for url in read_index(cwd / "data" / "digits").urls("test"):
        for ref in shard_samples(url):
            ImageOps.invert(Image.open(io.BytesIO(read_image(ref))).convert("L")).save(
                inverted / f"{ref.sample_id}.png"
            )
    apart = cli_in(capsys, monkeypatch, cwd, "adversarial", "--run-dir", "runs/digits", "--against", str(inverted))
    assert apart.returncode == 0, apart.stderr[-2000:]
    assert json.loads((cwd / "runs" / "digits" / "ensemble" / "adversarial-inverted.json").read_text())["auc"] > 0.9
    parent = MlflowClient(report["mlflow"]["tracking_uri"]).get_run(report["mlflow"]["parent_run_id"])
    assert parent.data.metrics["adversarial_auc_test"] == pytest.approx(holdout["auc"])
    assert parent.data.metrics["adversarial_auc_inverted"] > 0.9
    missing = cli_in(capsys, monkeypatch, cwd, "adversarial", "--run-dir", "runs/digits", "--against", "nowhere")
    assert missing.returncode == 2 and "adversarial: not a folder: nowhere" in last_line(missing.stderr)
