"""A finished job whose files are later lost or damaged is refused by `aggregate` with one line naming the file,
shown as damaged by `status`, and trained again (only it) by the next run of the main command."""

from __future__ import annotations

import contextlib
import json
import shutil

import pytest

from distrain import cli, run
from distrain.orchestration.ledger import Ledger, aggregate_id

from conftest import distrain_cli, last_line

pytestmark = pytest.mark.slow

TINY = ["model.names=[test_resnet]", "data.image_size=16", "cv.folds=3", "cv.seeds=[1]", "train.epochs=1",
        "train.progress=false", "ensemble.max_rounds=20", "experiment=dmg", "data.num_workers=0"]  # fmt: skip
JOBS = [f"test_resnet-s1-f{f}" for f in range(3)]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished study of 3 jobs, run through the main command's own `main` in this process."""
    from accelerate.state import AcceleratorState, GradientState

    cwd = tmp_path_factory.mktemp("damaged")
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    with contextlib.chdir(cwd):
        assert run.main(TINY) == 0
    return cwd


def copy_of(finished, tmp_path):
    for name in ("runs", "data"):
        shutil.copytree(finished / name, tmp_path / name)
    return tmp_path / "runs" / "dmg"


def _truncate(path):
    path.write_bytes(path.read_bytes()[:-40])


def _flip(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE = {
    "done.json deleted": ("done.json", lambda p: p.unlink(), "done.json is missing"),
    "done.json not JSON": ("done.json", lambda p: p.write_text("{"), "done.json is not valid JSON"),
    "done.json of another job": ("done.json", lambda p: p.write_text('{"id": "x"}'), "does not describe"),
    "oof.npz truncated": ("oof.npz", _truncate, "(truncated or replaced)"),
    "oof.npz corrupted": ("oof.npz", _flip, "does not match its sha256"),
    "test.npz deleted": ("test.npz", lambda p: p.unlink(), "test.npz is missing"),
    "best.pt truncated": ("best.pt", _truncate, "(truncated or replaced)"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_file_is_named_by_status_and_refused_by_aggregate(finished, tmp_path, case, capsys, monkeypatch):
    """Through the console script's own `main`, in this process (an interpreter start per command would cost
    most of the test's time)."""
    run_dir = copy_of(finished, tmp_path)
    monkeypatch.chdir(tmp_path)
    name, damage, phrase = DAMAGE[case]
    damage(run_dir / "jobs" / JOBS[1] / name)
    capsys.readouterr()
    assert cli.main(["status", "--run-dir", "runs/dmg", "--json"]) == 0
    row = next(r for r in json.loads(capsys.readouterr().out)["jobs"] if r["job_id"] == JOBS[1])
    if case != "oof.npz corrupted":  # status compares sizes only; the sha256 is checked where the file is read
        assert row["status"] == "damaged" and phrase in row["last_error"], row
    code = cli.main(["aggregate", "--run-dir", "runs/dmg"])
    out, err = capsys.readouterr()
    assert code == 2, out + err
    line = last_line(err)
    assert JOBS[1] in line and (phrase in line or "not finished (no OOF)" in line), line  # no done.json: unfinished
    assert "Traceback" not in out + err


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_main_command_trains_only_the_damaged_jobs_again(finished, tmp_path, capsys, monkeypatch):
    """The main command through its own `main`, in this process (no interpreter start)."""
    run_dir = copy_of(finished, tmp_path)
    (run_dir / "jobs" / JOBS[0] / "done.json").unlink()
    _flip(run_dir / "jobs" / JOBS[2] / "best.pt")
    _truncate(run_dir / "jobs" / JOBS[2] / "oof.npz")
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    code = run.main(TINY)
    out, err = capsys.readouterr()
    assert code == 0, out[-2000:] + err[-2000:]
    assert f"{JOBS[0]}: " in out and "is trained again" in out
    ledger = Ledger(run_dir)
    statuses = {j: [(a.end or {}).get("status") for a in ledger.attempts(j)] for j in JOBS + [aggregate_id(JOBS)]}
    assert statuses == {
        JOBS[0]: ["done", "damaged", "done"],
        JOBS[1]: ["done"],
        JOBS[2]: ["done", "damaged", "done"],
        aggregate_id(JOBS): ["done", "damaged", "done"],
    }
    assert list((run_dir / "jobs" / JOBS[2]).glob("damaged-*/oof.npz"))  # set aside, not deleted
    monkeypatch.chdir(tmp_path)  # the run's config names its data relative to where it ran
    again = distrain_cli(capsys, "aggregate", "--run-dir", str(run_dir))
    assert again.returncode == 0, again.stderr
