import json
import os
import stat
import subprocess
import sys

from distrain.fsutil import atomic_write_json, create_exclusive_json


def test_atomic_writes_are_complete_and_follow_the_umask(tmp_path):
    """Written files get the mode open() would give (mkstemp alone makes them 0600, unreadable by the team)."""
    code = (
        "import os, sys; os.umask(0o022); from distrain.fsutil import atomic_write_json; "
        "atomic_write_json(sys.argv[1], {'a': 1})"
    )
    target = tmp_path / "report.json"
    subprocess.run([sys.executable, "-c", code, str(target)], check=True)
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o644
    assert json.loads(target.read_text()) == {"a": 1}
    atomic_write_json(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 2} and not list(tmp_path.glob(".*.tmp"))


def test_create_exclusive_json_creates_once(tmp_path):
    assert create_exclusive_json(tmp_path / "x.json", {"n": 1})
    assert not create_exclusive_json(tmp_path / "x.json", {"n": 2})
    assert json.loads((tmp_path / "x.json").read_text()) == {"n": 1}
