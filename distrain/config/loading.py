"""YAML in, a validated `Config` out: distrain's YAML dialect, `a.b=value` overrides, loading a config file or
a saved run directory's config, and the flat views (MLflow params, config diffs)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml

from distrain.config.lookups import check_auto_augment, check_model_names, check_optimizer
from distrain.config.schema import VOLATILE_KEYS, Config
from distrain.config.typecheck import build_dataclass
from distrain.config.urls import check_no_password
from distrain.errors import ConfigError


class _Yaml12Loader(yaml.SafeLoader):
    """YAML with 1.2 scalars: only true/false are booleans (so `precision: no` stays the string "no",
    as accelerate spells it) and `1e-3` is a float."""


_Yaml12Loader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?(?:[eE][-+]?[0-9]+)$"),
    list("-+0123456789"),
)


def yaml_load(text: str) -> Any:
    """Parse YAML text with distrain's YAML 1.2-style scalars."""
    return yaml.load(text, Loader=_Yaml12Loader)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split `a.b=value` into (['a', 'b'], parsed value); the value is read as a YAML scalar or list."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value, e.g. train.epochs=3")
    key, _, raw_value = text.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml_load(raw_value) if raw_value.strip() else ""
    except yaml.YAMLError:
        raise ConfigError(f"override {text!r}: value is not valid YAML") from None
    return key.split("."), value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Return a copy of `raw` with each `a.b=value` override set (unknown keys are caught by validation)."""
    import copy

    out = copy.deepcopy(raw)
    for text in overrides:
        path, value = parse_override(text)
        try:
            set_path(out, path, value)
        except ConfigError as e:
            raise ConfigError(f"override {text!r}: {e}") from None
    return out


def set_path(tree: dict, path: list[str], value: Any) -> None:
    """Set `tree[a][b]... = value` for path [a, b, ...], making missing sections (unknown keys are caught by
    validation); ConfigError if a part names a value, not a section."""
    node = tree
    for part in path[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{part!r} is not a section")
        node = child
    node[path[-1]] = value


def config_from_dict(raw: dict, *, check_models: bool = True) -> Config:
    """Validate a plain mapping (as read from YAML) into a Config, or raise ConfigError.
    check_models=False skips looking the model names up in timm's registry (see check_model_names) and
    looking for model.pretrained_file (a saved run directory's config was checked when the run began)."""
    cfg = build_dataclass(Config, raw, "")
    if check_models:
        check_model_names(cfg.model.names)
        check_auto_augment(cfg.augment.auto_augment)
        check_optimizer(cfg.optim.name)
        if cfg.model.pretrained_file and not Path(cfg.model.pretrained_file).is_file():
            raise ConfigError(f"model.pretrained_file: no such file: {cfg.model.pretrained_file}")
    return cfg


def load_config(path: str | os.PathLike | None, overrides: list[str] = ()) -> Config:
    """Read a YAML config (None: all defaults), apply overrides, validate. Raises ConfigError."""
    raw: Any = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            raw = yaml_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise ConfigError(f"{p}: malformed YAML{where}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: expected a mapping at top level, got {type(raw).__name__}")
    cfg = config_from_dict(apply_overrides(raw, list(overrides)))
    check_no_password(cfg.tracking.uri, "tracking.uri")  # a new config only: a run directory's saved one is
    check_no_password(cfg.sweep.storage, "sweep.storage")  # read as it is (made before this check, it still works)
    return cfg


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; used for MLflow params and config diffs."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_differences(old: dict, new: dict) -> list[str]:
    """Keys (ignoring VOLATILE_KEYS) whose values differ, as 'key: old -> new' lines."""
    a, b = flatten(old), flatten(new)
    diffs = []
    for key in sorted(set(a) | set(b)):
        if key.startswith(VOLATILE_KEYS):
            continue
        if a.get(key) != b.get(key):
            diffs.append(f"{key}: {a.get(key)!r} -> {b.get(key)!r}")
    return diffs


def dump_yaml(cfg: Config) -> str:
    """The resolved config as YAML (saved in the run directory and logged to MLflow)."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
