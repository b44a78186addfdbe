"""Ensembles across run directories: `distrain aggregate --run-dir runs/a --run-dir runs/b [--out DIR]`.

Run directories that share one fold manifest (the same hash: the same samples in the same folds) and the same
classes are ensembled as one study, their (model, seed) columns side by side; a column name found in two of
them is prefixed with its run directory's name (`a/convnext_tiny-s1`). The result is a directory of its own
(default `<run root>/<a>+<b>`) with `config.yaml` (the first run directory's, renamed, with the `ensemble.*`
overrides), `folds.json`, `sources.json` (the run directories and the overrides), `report.json`, `ensemble/`,
and its own MLflow study run and registered model. The run directories themselves are only read.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING

from distrain.config import Config, MembersConfig, apply_overrides, config_from_dict, dump_yaml, members_from_dict
from distrain.errors import DataError, FoldManifestMismatch
from distrain.fsutil import atomic_write_text
from distrain.orchestration.phases import check_ensemble_overrides, load_run_dir

if TYPE_CHECKING:
    from distrain.ensembles.aggregate import Source
    from distrain.study.folds import FoldManifest

SOURCES = "sources.json"


@dataclasses.dataclass(frozen=True)
class Combined:
    """What `combine_run_dirs` prepared: the directory written to, its config, the run directories read."""

    out: Path
    cfg: Config
    sources: list[Source]
    manifest: FoldManifest


def combine_run_dirs(run_dirs: list[Path], out: Path | None, overrides: list[str]) -> Combined:
    """Check that `run_dirs` can be ensembled together, then write `out`'s config.yaml, folds.json and
    sources.json. Refused with one line (BadInput) before anything is written: a run directory given twice or
    not one, different fold manifests (both hashes named), tasks or classes, an `out` that is a training
    run directory or combines other run directories, an override outside `ensemble.*`."""
    from distrain.study.folds import FoldManifest

    if len({d.resolve() for d in run_dirs}) < len(run_dirs):
        raise DataError(f"--run-dir: a run directory is given twice ({', '.join(map(str, run_dirs))})")
    configs = [load_run_dir(d) for d in run_dirs]
    manifests = [FoldManifest.from_json((d / "folds.json").read_text()) for d in run_dirs]
    for d, m in zip(run_dirs[1:], manifests[1:]):
        if m.hash != manifests[0].hash:
            raise FoldManifestMismatch(
                f"{run_dirs[0]} and {d} have different fold manifests ({manifests[0].hash[:12]} vs {m.hash[:12]}); "
                f"an ensemble across run directories needs the same samples in the same folds"
            )
    _check_same_labels(run_dirs, configs)
    out = out or run_dirs[0].parent / "+".join(d.name for d in run_dirs)
    overrides = _saved_overrides(out, run_dirs) + list(overrides)
    sources = _sources(run_dirs, configs)
    cfg = _combined_config(configs[0], out, overrides, sources)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "folds.json", manifests[0].to_json())
    atomic_write_text(out / "config.yaml", dump_yaml(_without_members(cfg)))  # members name the combined columns
    atomic_write_text(
        out / SOURCES, json.dumps({"run_dirs": [str(d) for d in run_dirs], "overrides": overrides}, indent=1)
    )
    return Combined(out, cfg, sources, manifests[0])


def refuse_combined(run_dir: Path, command: str) -> None:
    """DataError for a combined directory given where a training run directory is needed."""
    saved = run_dir / SOURCES
    if saved.is_file():
        names = json.loads(saved.read_text())["run_dirs"]
        raise DataError(f"{run_dir} ensembles {', '.join(names)} (it has no jobs of its own); run `distrain {command}` "
                        f"with {' '.join(f'--run-dir {n}' for n in names)}")  # fmt: skip


def _check_same_labels(run_dirs: list[Path], configs: list[Config]) -> None:
    """The same task and class names in every run directory (its data index), or DataError."""
    from distrain.data.index import read_index

    first = (configs[0].task, read_index(configs[0].data.root).classes)
    for d, cfg in zip(run_dirs[1:], configs[1:]):
        other = (cfg.task, read_index(cfg.data.root).classes)
        if other != first:
            raise DataError(
                f"{run_dirs[0]} and {d} have different tasks or classes ({first[0]} {first[1][:5]} vs "
                f"{other[0]} {other[1][:5]}); an ensemble across run directories needs the same labels"
            )


def _saved_overrides(out: Path, run_dirs: list[Path]) -> list[str]:
    """The `ensemble.*` overrides an earlier combination into `out` saved; refuses an `out` that is a training
    run directory or the combination of other run directories."""
    if out.resolve() in {d.resolve() for d in run_dirs}:
        raise DataError(f"--out {out}: is one of the run directories combined; give another folder")
    saved = out / SOURCES
    if not saved.is_file():
        if (out / "config.yaml").exists() or (out / "ledger").exists():
            raise DataError(f"--out {out}: a training run directory; give another folder")
        return []
    previous = json.loads(saved.read_text())
    if [Path(p).resolve() for p in previous["run_dirs"]] != [d.resolve() for d in run_dirs]:
        raise DataError(f"--out {out}: combines {', '.join(previous['run_dirs'])}; give another folder")
    return list(previous["overrides"])


def _sources(run_dirs: list[Path], configs: list[Config]) -> list[Source]:
    """One Source per run directory; those holding a column another one holds too get `<name>/` prefixes."""
    from distrain.ensembles.aggregate import Source

    plain = [Source(d, cfg) for d, cfg in zip(run_dirs, configs)]
    seen: dict[str, int] = {}
    for src in plain:
        for column in src.columns():
            seen[column] = seen.get(column, 0) + 1
    sources = [
        Source(src.run_dir, src.cfg, f"{src.run_dir.name}/" if any(seen[c] > 1 for c in src.columns()) else "")
        for src in plain
    ]
    columns = [c for src in sources for c in src.columns()]
    if len(set(columns)) < len(columns):
        raise DataError("--run-dir: run directories with the same name hold the same columns; rename one")
    return sources


def _combined_config(first: Config, out: Path, overrides: list[str], sources: list[Source]) -> Config:
    """The first run directory's config named after `out`, with `ensemble.*` overrides; `ensemble.members`
    is checked against the combined (possibly prefixed) columns."""
    from distrain.ensembles.aggregate import all_columns

    check_ensemble_overrides(overrides)
    raw = first.to_dict()
    raw["ensemble"]["members"] = {}  # the first's own members name its unprefixed columns: not carried over
    raw = apply_overrides(raw, overrides)
    members = members_from_dict(raw["ensemble"].pop("members"), all_columns(sources))
    raw.update(experiment=out.name, run_root=str(out.parent))
    cfg = config_from_dict(raw, check_models=False)
    # set, not dataclasses.replace(cfg, ...): Config's own check knows only the first run directory's columns
    cfg.ensemble = dataclasses.replace(cfg.ensemble, members=members)
    return cfg


def _without_members(cfg: Config) -> Config:
    return dataclasses.replace(cfg, ensemble=dataclasses.replace(cfg.ensemble, members=MembersConfig()))
