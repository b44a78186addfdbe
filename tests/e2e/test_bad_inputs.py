"""Bad input and damaged data through the real commands (`distrain.cli.main`, `distrain.run.main`, in this process
so the table stays fast): each case exits with its documented code (2: refused), says what is wrong in one line
naming the key, file or path, prints no traceback, and leaves nothing behind that would stop the correct run that
follows it. Damaged run-directory files (done.json, oof.npz, ...) are the table in test_damaged.py."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from distrain import cli, run
from distrain.errors import EXIT_BAD_INPUT, EXIT_OK
from distrain.orchestration.ledger import Ledger

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("fresh_accelerate_state")]

# num_workers=0: DataLoader workers forked from pytest's process take seconds each to start and to stop.
TINY = ["model.names=[test_resnet]", "data.image_size=16", "cv.folds=2", "cv.seeds=[1]", "train.epochs=1",
        "train.progress=false", "ensemble.max_rounds=5", "ensemble.register_model=false",
        "data.num_workers=0"]  # fmt: skip


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    """A workspace: digits shards, two class folders of PNGs, and CSVs naming them."""
    ws = tmp_path_factory.mktemp("bad")
    assert cli.main(["data", "digits", "--out", str(ws / "data" / "digits")]) == 0
    rng = np.random.default_rng(0)
    for c in "ab":
        for i in range(6):
            path = ws / "imgs" / c / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray((rng.random((8, 8)) * 255).astype("uint8")).save(path)
    return ws


def train(ws: Path, experiment: str, *extra: str) -> list[str]:
    return ["train", *TINY, "data.source=shards", f"data.root={ws / 'data' / 'digits'}", f"run_root={ws / 'runs'}",
            f"experiment={experiment}", *extra]  # fmt: skip


def data_copy(ws: Path, name: str) -> Path:
    """A fresh copy of the digits shards to damage."""
    target = ws / "data" / name
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(ws / "data" / "digits", target)
    return target


def csv(ws: Path, name: str, rows: list[tuple[str, str]], header: str = "path,label") -> str:
    (ws / name).write_text(header + "\n" + "".join(f"{p},{label}\n" for p, label in rows))
    return str(ws / name)


GOOD_ROWS = [(f"imgs/{c}/{i}.png", c) for c in "ab" for i in range(6)]


def _rewrite_index(ws: Path, name: str, change) -> Path:
    root = data_copy(ws, name)
    index = json.loads((root / "index.json").read_text())
    (root / "index.json").write_text(json.dumps(change(index)))
    return root


def _undecodable_folder(ws: Path) -> str:
    folder = ws / "imgs_bad"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(ws / "imgs", folder)
    (folder / "a" / "broken.png").write_bytes(b"\x89PNG not really")
    return str(folder)


def _one_class_folder(ws: Path) -> str:
    folder = ws / "imgs_one"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(ws / "imgs" / "a", folder / "a")
    return str(folder)


def _text_file(ws: Path) -> str:
    (ws / "notes.txt").write_text("not an image")
    return csv(ws, "nonimage.csv", GOOD_ROWS + [("notes.txt", "a")])


# Refused before any work: (argv from the workspace, what the one line says). Exit 2 unless the table says.
REFUSED = {
    "unknown config key": (lambda ws: train(ws, "bad", "train.nope=1"), "train.nope: unknown key"),
    "value of the wrong type": (lambda ws: train(ws, "bad", "train.epochs=abc"), "train.epochs: expected int"),
    "config file missing": (lambda ws: ["train", "--config", str(ws / "nope.yaml")], "config file not found"),
    "config not YAML": (
        lambda ws: (ws / "bad.yaml").write_text("a: [1,\n") and ["train", "--config", str(ws / "bad.yaml")],
        "malformed YAML at line 2",
    ),
    "unknown timm model": (lambda ws: train(ws, "bad", "model.names=[no_such_net]"), "unknown timm model"),
    "model cannot take the input size": (
        lambda ws: train(ws, "bad", "model.names=[test_convnext]", "data.image_size=28"),
        "model 'test_convnext' cannot take 28 px inputs",
    ),
    "a batch larger than memory": (lambda ws: train(ws, "bad", "data.image_size=100000"), "data.image_size=100000"),
    "batch larger than a fold": (lambda ws: train(ws, "bad", "train.batch_size=5000"), "train.batch_size=5000"),
    "tracking URI of no store": (lambda ws: train(ws, "bad", "tracking.uri=foo://bar"), "tracking.uri='foo://bar'"),
    "tracking URI of MLflow's file store": (
        lambda ws: train(ws, "bad", "tracking.uri=file:./mlruns"),
        "MLflow 3 refuses its file store",
    ),
    "a password in a stored URL": (
        lambda ws: train(ws, "bad", "tracking.uri=postgresql://me:s3cret@db/mlflow"),
        "tracking.uri: the URL holds a password",
    ),
    "shard argument out of range": (lambda ws: train(ws, "bad", "--shard", "3/2"), "--shard: need 0 <= i < n"),
    "labels beyond data.num_classes": (lambda ws: train(ws, "bad", "data.num_classes=5"), "labels outside [0, 5)"),
    "data root without an index": (lambda ws: train(ws, "bad", f"data.root={ws / 'nothing'}"), "no index.json"),
    "index.json not JSON": (
        lambda ws: (
            (data_copy(ws, "notjson") / "index.json").write_text("{")
            and train(ws, "bad", f"data.root={ws / 'data' / 'notjson'}")
        ),
        "index.json: not valid JSON",
    ),
    "index.json without samples": (
        lambda ws: train(ws, "bad", f"data.root={_rewrite_index(ws, 'nosamples', lambda d: d.pop('samples') and d)}"),
        "not a distrain index (missing key 'samples')",
    ),
    "index.json listing no samples": (
        lambda ws: train(ws, "bad", f"data.root={_rewrite_index(ws, 'nolist', lambda d: {**d, 'samples': []})}"),
        "index.json lists no samples",
    ),
    "index.json a list": (
        lambda ws: train(ws, "bad", f"data.root={_rewrite_index(ws, 'alist', lambda d: [])}"),
        "unknown format 'list'",
    ),
    "shard listed in the index missing": (
        lambda ws: (
            [p.unlink() for p in sorted(data_copy(ws, "gone").glob("cv-*.tar"))[:1]]
            and train(ws, "bad", f"data.root={ws / 'data' / 'gone'}")
        ),
        "shard cv-000000.tar listed in index.json is missing",
    ),
    "pack: undecodable image": (
        lambda ws: ["data", "pack", "--images", _undecodable_folder(ws), "--out", str(ws / "packed")],
        "broken.png: not an image PIL can read",
    ),
    "pack: one class folder": (
        lambda ws: ["data", "pack", "--images", _one_class_folder(ws), "--out", str(ws / "packed")],
        "expected one subfolder per class, found 1",
    ),
    "pack: CSV with an empty label": (
        lambda ws: [
            "data",
            "pack",
            "--csv",
            csv(ws, "empty.csv", GOOD_ROWS[:-1] + [(GOOD_ROWS[-1][0], "")]),
            "--out",
            str(ws / "packed"),
        ],  # fmt: skip
        "row 13 has an empty label",
    ),
    "pack: CSV of a single class": (
        lambda ws: [
            "data",
            "pack",
            "--csv",
            csv(ws, "one.csv", [(p, "a") for p, _ in GOOD_ROWS]),
            "--out",
            str(ws / "packed"),
        ],  # fmt: skip
        "all 12 samples have the label 'a'",
    ),
    "pack: CSV naming a text file": (
        lambda ws: ["data", "pack", "--csv", _text_file(ws), "--out", str(ws / "packed")],
        "notes.txt: not an image PIL can read",
    ),
    "pack: CSV naming a missing image": (
        lambda ws: [
            "data",
            "pack",
            "--csv",
            csv(ws, "missing.csv", GOOD_ROWS + [("imgs/a/none.png", "a")]),
            "--out",
            str(ws / "packed"),
        ],  # fmt: skip
        "image not found: imgs/a/none.png",
    ),
    "pack: CSV without the header": (
        lambda ws: [
            "data",
            "pack",
            "--csv",
            csv(ws, "nohdr.csv", GOOD_ROWS, header="file,class"),
            "--out",
            str(ws / "packed"),
        ],  # fmt: skip
        "expected a header with columns path,label",
    ),
    "pack: both --images and --csv": (
        lambda ws: [
            "data",
            "pack",
            "--images",
            str(ws / "imgs"),
            "--csv",
            csv(ws, "ok.csv", GOOD_ROWS),
            "--out",
            str(ws / "packed"),
        ],  # fmt: skip
        "give exactly one of --images DIR, --csv FILE or --npz FILE",
    ),
    "pack: --out already exists": (
        lambda ws: ["data", "pack", "--images", str(ws / "imgs"), "--out", str(ws / "data" / "digits")],
        "already exists",
    ),
    "status of a folder that is no run directory": (
        lambda ws: ["status", "--run-dir", str(ws / "imgs")],
        "not a distrain run directory",
    ),
    "aggregate of a folder that is no run directory": (
        lambda ws: ["aggregate", "--run-dir", str(ws / "imgs")],
        "not a distrain run directory",
    ),
    "retry of a folder that is no run directory": (
        lambda ws: ["retry", "--run-dir", str(ws / "imgs")],
        "not a distrain run directory",
    ),
}


def invoke(argv: list[str]) -> int:
    """One command as the console script runs it (`distrain train` is the main job, distrain/run.py)."""
    return run.main(argv[1:]) if argv[0] == "train" else cli.main(argv)


def assert_one_line(code: int, expected_code: int, said: str, out: str, err: str) -> None:
    lines = (out + err).strip().splitlines()
    assert code == expected_code, out[-2000:] + err[-2000:]
    assert "Traceback" not in out + err, err[-3000:]
    errors = [line for line in lines if line.startswith("distrain: error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], lines[-5:]
    assert said in errors[0], errors[0]


@pytest.mark.parametrize("case", list(REFUSED))
def test_bad_input_is_refused_in_one_line_before_any_work(ws, case, capsys):
    argv, said = REFUSED[case]
    argv = argv(ws)
    capsys.readouterr()
    code = invoke(argv)
    out, err = capsys.readouterr()
    assert_one_line(code, EXIT_BAD_INPUT, said, out, err)
    assert not (ws / "runs" / "bad" / "ledger" / "jobs").exists()  # no job was claimed, none will look failed
    assert not (ws / "packed").exists()  # a refused pack leaves no half-written output


def test_after_the_refusals_the_correct_commands_succeed(ws, capsys):
    """Nothing the refused commands left behind is in the way: the same run directory trains and aggregates,
    the same --out packs (ordered after the table by name: pytest runs a module's tests in file order)."""
    assert invoke(["data", "pack", "--images", str(ws / "imgs"), "--out", str(ws / "packed"), "--min-shards", "2"]) == 0
    assert invoke(train(ws, "bad")) == EXIT_OK, capsys.readouterr()
    report = json.loads((ws / "runs" / "bad" / "report.json").read_text())
    assert len(report["jobs"]) == 2 and not report["failed_jobs"]
    capsys.readouterr()
    assert invoke(["retry", "--run-dir", str(ws / "runs" / "bad"), "--job", "nope-s1-f0"]) == EXIT_BAD_INPUT
    assert "'nope-s1-f0' is not a job of" in capsys.readouterr().err


def _truncate_half(root: Path) -> str:
    shard = sorted(root.glob("cv-*.tar"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    return shard.name


def _corrupt_header(root: Path) -> str:
    shard = sorted(root.glob("cv-*.tar"))[0]
    data = bytearray(shard.read_bytes())
    data[1024 + 100 : 1024 + 110] = b"\xff" * 10  # inside the second member's header: its checksum fails
    shard.write_bytes(bytes(data))
    return shard.name


def _corrupt_image(root: Path) -> str:
    from distrain.data.shards import shard_samples

    shard = sorted(root.glob("cv-*.tar"))[0]
    ref = shard_samples(str(shard))[0]
    data = bytearray(shard.read_bytes())
    data[ref.offset : ref.offset + ref.size] = b"\x00" * ref.size  # the header stays valid, the PNG does not
    shard.write_bytes(bytes(data))
    return ref.sample_id


# Found when a job reads the data: the job fails once (not retried: every attempt would meet it), exit 2.
READ_TIME = {
    "shard truncated": (_truncate_half, "truncated"),
    "shard header corrupted": (_corrupt_header, "bad tar header"),
    "image bytes corrupted": (_corrupt_image, "image cannot be decoded"),
}


@pytest.mark.parametrize("case", list(READ_TIME))
def test_damaged_shards_fail_the_job_once_in_one_line(ws, case, capsys):
    damage, said = READ_TIME[case]
    name = "read-" + case.replace(" ", "-")
    root = data_copy(ws, name)
    named = damage(root)
    capsys.readouterr()
    code = invoke(train(ws, name, f"data.root={root}"))
    out, err = capsys.readouterr()
    assert_one_line(code, EXIT_BAD_INPUT, said, out, err)
    assert named in err or said in err
    ledger = Ledger(ws / "runs" / name)
    attempts = [a for job in ("test_resnet-s1-f0", "test_resnet-s1-f1") for a in ledger.attempts(job)]
    assert [a.end["status"] for a in attempts] == ["failed"]  # one attempt, not retried, the other job not started


def test_jobs_failed_for_good_on_bad_data_train_after_the_fix_and_distrain_retry(ws, capsys):
    """With no retries left, the refusal says how to revive the job once the data is fixed (`distrain retry` in
    its one line); after the fix and `distrain retry`, the same command trains the jobs and exits 0."""
    root = data_copy(ws, "fixed-later")
    good = {p.name: p.read_bytes() for p in root.glob("*.tar")}
    _truncate_half(root)
    argv = train(ws, "fixed-later", f"data.root={root}", "scheduler.max_retries=1")
    capsys.readouterr()
    code = invoke(argv)
    out, err = capsys.readouterr()
    assert_one_line(code, EXIT_BAD_INPUT, f"distrain retry --run-dir {ws / 'runs' / 'fixed-later'}", out, err)
    for name, data in good.items():  # the data is fixed
        (root / name).write_bytes(data)
    assert invoke(["retry", "--run-dir", str(ws / "runs" / "fixed-later")]) == EXIT_OK
    assert invoke(argv) == EXIT_OK
    report = json.loads((ws / "runs" / "fixed-later" / "report.json").read_text())
    assert len(report["jobs"]) == 2 and not report["failed_jobs"]


@contextlib.contextmanager
def tmpfs(path: Path, options: str):
    """A small tmpfs at `path` (disk full, read-only); skips the test where mounting is not permitted."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN): {mounted.stderr.decode()[:200]}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


STORAGE = {
    "run root read-only": ("ro,size=1m", lambda ws, at: train(ws, "st", f"run_root={at}/runs"), "Read-only file"),
    "run root full, MLflow store in it": (
        "size=256k",
        lambda ws, at: train(ws, "st", f"run_root={at}/runs", f"tracking.uri=sqlite:///{at}/runs/mlflow.db"),
        "cannot write the MLflow store",
    ),
    "run root full, a checkpoint cannot be written": (
        "size=256k",
        lambda ws, at: train(ws, "st", f"run_root={at}/runs", f"tracking.uri=sqlite:///{ws}/elsewhere.db"),
        "No space left on device",
    ),
    "pack output read-only": (
        "ro,size=1m",
        lambda ws, at: ["data", "pack", "--images", str(ws / "imgs"), "--out", str(at / "packed")],
        "Read-only file",
    ),
}


@pytest.mark.parametrize("case", list(STORAGE))
def test_full_or_read_only_storage_is_named_in_one_line(ws, case, capsys):
    options, argv, said = STORAGE[case]
    with tmpfs(ws / ("mnt-" + case.replace(" ", "-")), options) as at:
        capsys.readouterr()
        code = invoke(argv(ws, at))
        out, err = capsys.readouterr()
    assert_one_line(code, EXIT_BAD_INPUT, said, out, err)
    assert str(at) in err.strip().splitlines()[-1]  # the path is named
