"""A sweep's search space: the config keys a sweep tunes and the ranges Optuna samples them from, read from
YAML and checked against the config before any trial starts.

    optim.lr: {low: 2.5e-4, high: 6.0e-4, log: true}   # a float key: a float range (log or linear)
    train.epochs: {low: 4, high: 12}                    # an int key: an int range
    augment.mixup: {choices: [0.0, 0.2, 0.4]}           # any key: one of these values

A range's type is its key's type in the config. Every bound and choice is applied to the config and validated
as the main job would (so `optim.lr: {low: -1, ...}` is refused with the config's own message).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distrain.config import Config, ConfigError, config_from_dict, flatten, set_path, yaml_load

# What a trial may not change: the data, the folds, the plan, and where and how things run.
FIXED_KEYS = ("experiment", "run_root", "task", "data.root", "data.source", "data.num_classes", "cv.", "model.names",
              "model.overrides", "model.pretrained", "tracking.", "scheduler.", "ensemble.", "sweep.")  # fmt: skip
_ENTRY_KEYS = {"low", "high", "log", "choices"}


@dataclass(frozen=True)
class Param:
    """One tuned config key: a range [low, high] of the key's type (log-scaled or not), or choices."""

    key: str
    kind: str  # float | int | categorical
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    choices: tuple = ()

    def values_to_check(self) -> list[Any]:
        """The values whose configs must all be valid: both bounds, or every choice."""
        return list(self.choices) if self.kind == "categorical" else [self.low, self.high]


def load_space(path: str | Path, base: Config) -> list[Param]:
    """The search space in `path`, every entry checked against `base` (ConfigError with one line naming the key)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: search space file not found")
    raw = yaml_load(p.read_text())
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{p}: expected a mapping of config keys to ranges, e.g. optim.lr: {{low: 1e-4, high: 1e-2}}")
    params = [_param(str(key), entry, base) for key, entry in raw.items()]
    for param in params:
        for value in param.values_to_check():
            apply_values(base, {param.key: value})
    return params


def _param(key: str, entry: Any, base: Config) -> Param:
    known = flatten(base.to_dict())
    if key not in known:
        raise ConfigError(f"space: {key}: unknown config key")
    if key.startswith(FIXED_KEYS):
        raise ConfigError(f"space: {key}: not tunable by a sweep (it changes the data, folds, plan or where it runs)")
    if not isinstance(entry, dict) or not entry or set(entry) - _ENTRY_KEYS:
        raise ConfigError(f"space: {key}: expected {{low: .., high: .., log: ..}} or {{choices: [..]}}, got {entry!r}")
    if "choices" in entry:
        choices = entry["choices"]
        if set(entry) != {"choices"} or not isinstance(choices, list) or not choices:
            raise ConfigError(f"space: {key}: choices must be a non-empty list and come alone, got {entry!r}")
        return Param(key, "categorical", choices=tuple(choices))
    current = known[key]
    if isinstance(current, bool) or not isinstance(current, (int, float)):
        raise ConfigError(f"space: {key}: a {type(current).__name__} key takes {{choices: [..]}}, not a range")
    kind = "int" if isinstance(current, int) else "float"
    low, high, log = entry.get("low"), entry.get("high"), entry.get("log", False)
    numbers = (int,) if kind == "int" else (int, float)
    if not all(isinstance(v, numbers) and not isinstance(v, bool) for v in (low, high)) or not isinstance(log, bool):
        raise ConfigError(f"space: {key}: low and high must be {kind}s and log true/false, got {entry!r}")
    if not low < high:
        raise ConfigError(f"space: {key}: impossible range: low {low} is not below high {high}")
    if log and low <= 0:
        raise ConfigError(f"space: {key}: impossible range: a log range needs low > 0, got {low}")
    return Param(key, kind, low if kind == "int" else float(low), high if kind == "int" else float(high), log)


def apply_values(base: Config, values: dict[str, Any]) -> Config:
    """`base` with the dotted keys set to `values`, validated as a config is (ConfigError naming the value)."""
    raw = base.to_dict()
    for key, value in values.items():
        set_path(raw, key.split("."), value)
    try:
        return config_from_dict(raw)  # as the main job checks it: the optimizer, augment policy, ...
    except ConfigError as e:
        shown = ", ".join(f"{k}={v!r}" for k, v in values.items())
        raise ConfigError(f"space: {shown}: {e}") from None


def suggest(trial, params: list[Param]) -> dict[str, Any]:
    """The values an Optuna trial samples for each param (`trial.suggest_*`)."""
    values = {}
    for p in params:
        if p.kind == "categorical":
            values[p.key] = trial.suggest_categorical(p.key, list(p.choices))
        elif p.kind == "int":
            values[p.key] = trial.suggest_int(p.key, p.low, p.high, log=p.log)
        else:
            values[p.key] = trial.suggest_float(p.key, p.low, p.high, log=p.log)
    return values
