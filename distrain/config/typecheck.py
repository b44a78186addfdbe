"""The small type checker that turns a YAML mapping into a config dataclass: each value checked against its
field's annotation (`int`, `float`, `str`, `bool`, `list[...]`, `dict[...]`, `Literal[...]`, nested dataclasses),
every refusal a `ConfigError` naming the dotted key and the value."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

from distrain.errors import ConfigError


def require(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: invalid value {value!r} (expected {expected})")


def check_type(key: str, value: Any, hint: Any) -> Any:
    """Return `value` coerced to `hint` where that is lossless (int -> float), else raise ConfigError."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return check_type(key, value, args[0])
    if origin is dict:
        key_type, item = typing.get_args(hint)
        if not isinstance(value, dict) or not all(type(k) is key_type for k in value):
            raise ConfigError(f"{key}: expected a mapping with {key_type.__name__} keys, got {value!r}")
        return {k: check_type(f"{key}.{k}", v, item) for k, v in value.items()}
    if hint is typing.Any:
        return value
    if origin is typing.Literal:
        choices = typing.get_args(hint)
        require(value in choices, key, value, f"one of {choices}")
        return value
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list of {item.__name__}, got {value!r}")
        return [check_type(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is str and value is None:
        return ""
    if hint in (int, float, str, bool):
        if isinstance(value, bool) and hint is not bool:
            raise ConfigError(f"{key}: expected {hint.__name__}, got {value!r}")
        if not isinstance(value, hint):
            raise ConfigError(f"{key}: expected {hint.__name__}, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {hint!r} for {key}")  # a bug in this module, not in the YAML


def build_dataclass(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in known:
            raise ConfigError(f"{prefix}{key}: unknown key (known: {', '.join(sorted(known))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in raw:
            continue
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            kwargs[f.name] = build_dataclass(hint, raw[f.name] if raw[f.name] is not None else {}, f"{prefix}{f.name}.")
        else:
            kwargs[f.name] = check_type(f"{prefix}{f.name}", raw[f.name], hint)
    return cls(**kwargs)
