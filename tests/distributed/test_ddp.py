import json

from distrain.data.pack import write_digits

from conftest import REPO, accelerate_launch, run_cmd


def test_two_process_ddp_gather_has_no_duplicates(tmp_path):
    write_digits(tmp_path / "digits", shard_size=100)
    proc = run_cmd(
        [
            *accelerate_launch(2, REPO / "tests" / "scripts" / "ddp_gather_check.py"),
            str(tmp_path / "digits"),
            str(tmp_path),
        ],
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("rank*.json"))]
    assert sorted(r["rank"] for r in rows) == [0, 1] and all(r["world"] == 2 for r in rows)
    for r in rows:
        assert r["rows"] == r["distinct"] == r["expected"] and r["covers"]
        assert r["gathered_ranks"] == 2 and r["sum"] == 2.0
    assert rows[0]["digest"] == rows[1]["digest"]  # every rank holds the same gathered ids and probabilities
