"""The growth policy of a run directory: which config changes add jobs to a study (new seeds, new backbones)
and which are refused (anything the finished jobs depended on)."""

from __future__ import annotations

from distrain.config import config_differences


def growth_differences(old: dict, new: dict) -> tuple[list[str], list[str]]:
    """(what grows, what is refused) between a run directory's config and a new one, as 'key: old -> new' lines.
    A study grows by new seeds (`cv.seeds`), new backbones (`model.names`) and the new backbones' own
    `model.overrides` and `model.factory_args`, the old ones kept: the finished jobs did not depend on them. Any
    other difference (ignoring VOLATILE_KEYS) is refused, as is dropping a seed or backbone."""
    grows, refused = [], []
    for key in ("cv.seeds", "model.names"):
        section, name = key.split(".")
        before, after = old[section][name], new[section][name]
        if before == after:
            continue
        line = f"{key}: {before!r} -> {after!r}"
        (grows if set(before) < set(after) and len(set(after)) == len(after) else refused).append(line)
    new_models = set(new["model"]["names"]) - set(old["model"]["names"])
    for line in config_differences(old, new):
        key = line.split(": ", 1)[0]
        if key in ("cv.seeds", "model.names"):
            continue
        own = ("model.overrides", "model.factory_args")  # a new backbone's own settings
        if any(key.startswith(f"{o}.{m}.") or key == f"{o}.{m}" for o in own for m in new_models):
            grows.append(line)
        else:
            refused.append(line)
    return grows, refused
