"""Ensembles across run directories: which columns are prefixed, and the members and overrides refused.
(The run itself, its model and the refusal of different fold manifests: tests/e2e/test_grow.py.)"""

import json
from pathlib import Path

import pytest

from distrain.config import config_from_dict
from distrain.errors import ConfigError, DataError
from distrain.orchestration.combined import _combined_config, _sources, refuse_combined


def cfg(models, seeds):
    return config_from_dict({"model": {"names": models}, "cv": {"seeds": seeds}}, check_models=False)


def test_only_run_directories_sharing_a_column_are_prefixed():
    a, b, c = Path("runs/a"), Path("runs/b"), Path("runs/c")
    sources = _sources([a, b, c], [cfg(["resnet"], [1]), cfg(["convnext"], [1]), cfg(["resnet"], [1, 2])])
    assert [s.prefix for s in sources] == ["a/", "", "c/"]
    assert [c for s in sources for c in s.columns()] == ["a/resnet-s1", "convnext-s1", "c/resnet-s1", "c/resnet-s2"]
    with pytest.raises(DataError, match="same name"):
        _sources([Path("x/a"), Path("y/a")], [cfg(["resnet"], [1]), cfg(["resnet"], [1])])


def test_members_name_the_combined_columns_and_only_ensemble_keys_change():
    sources = _sources([Path("runs/a"), Path("runs/b")], [cfg(["resnet"], [1]), cfg(["resnet", "convnext"], [1])])
    first = cfg(["resnet"], [1])
    out = Path("runs/a+b")
    combined = _combined_config(first, out, ["ensemble.members.exclude=[b/resnet-s1]"], sources)
    assert combined.ensemble.members.exclude == ["b/resnet-s1"] and combined.experiment == "a+b"
    assert _combined_config(first, out, ["ensemble.members.pin=[b/convnext]"], sources).ensemble.members.pin == [
        "b/convnext"
    ]  # a backbone of one run directory
    with pytest.raises(ConfigError, match="ensemble.members.exclude"):
        _combined_config(first, out, ["ensemble.members.exclude=[resnet-s1]"], sources)  # prefixed: no such column
    with pytest.raises(ConfigError, match="ensemble.members.exclude"):
        _combined_config(first, out, ["ensemble.members.exclude=[a/resnet, b/resnet, b/convnext]"], sources)
    with pytest.raises(ConfigError, match=r"ensemble\.\* keys only"):
        _combined_config(first, out, ["train.epochs=3"], sources)


def test_a_combined_directory_is_not_taken_for_a_training_run(tmp_path):
    out = tmp_path / "a+b"
    out.mkdir()
    refuse_combined(out, "status")  # not (yet) a combined directory: nothing to say
    (out / "sources.json").write_text(json.dumps({"run_dirs": ["runs/a", "runs/b"], "overrides": []}))
    with pytest.raises(DataError, match="run `distrain status` with --run-dir runs/a --run-dir runs/b"):
        refuse_combined(out, "status")
