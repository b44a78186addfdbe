"""Config checks that look names up in timm (models, optimizers, auto-augment policies) or import them (model
factories). Kept apart from the schema because timm takes seconds to import: a saved run directory's config is
read back without them."""

from __future__ import annotations

import difflib
import importlib
import re
from collections.abc import Callable

from distrain.errors import ConfigError

_FACTORY = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
"""`package.module:function` (the function may be an attribute path, `module:Class.build`)."""
_HUB_PREFIXES = ("hf-hub:", "hf_hub:", "local-dir:")
"""timm's own `prefix:` names: left to timm (which distrain does not load that way: they are refused as unknown)."""


def is_factory_name(name: str) -> bool:
    """Whether a `model.names` entry is an import path to the user's own model factory rather than a timm name."""
    return ":" in name and not name.startswith(_HUB_PREFIXES)


def import_factory(name: str) -> Callable:
    """The callable a `package.module:function` entry names, imported. Raises ConfigError, in one line naming the
    entry, when it is malformed, does not import (no such module or attribute, or the module raises) or is not
    callable."""
    if not _FACTORY.fullmatch(name):
        raise ConfigError(f"model.names: {name!r} is neither a timm name nor an import path package.module:function")
    module_name, _, path = name.partition(":")
    try:
        found = importlib.import_module(module_name)
        for attr in path.split("."):
            found = getattr(found, attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"model.names: {name!r} does not import ({_first_line(e)})") from None
    except Exception as e:  # the module's own code failed while it was imported
        raise ConfigError(f"model.names: {name!r} does not import ({type(e).__name__}: {_first_line(e)})") from None
    if not callable(found):
        raise ConfigError(
            f"model.names: {name!r} is not callable (of type {type(found).__name__}); expected a function "
            "that builds a model"
        )
    return found


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0][:300]


def check_model_names(names: list[str]) -> None:
    """Raise ConfigError naming any model timm does not know (with similar names) and any factory path that does
    not import. Kept out of ModelConfig's own checks because timm's registry takes seconds to import and a
    factory's module may be importable only where jobs run: a saved run directory's config (checked when the run
    started) is read back without them. Whether a factory builds a module is checked where the data's channels
    are known (`distrain.training.models.check_inputs`)."""
    import timm

    for name in names:
        if is_factory_name(name):
            import_factory(name)
        elif not timm.is_model(name):
            close = timm.list_models(f"*{name.split('_')[0]}*")[:5]
            hint = f" (similar: {', '.join(close)})" if close else ""
            raise ConfigError(f"model.names: unknown timm model {name!r}{hint}")


def timm_optim():
    """`timm.optim`, imported with torch's dynamo settings kept: importing it (its `kron` module) raises
    `torch._dynamo.config.cache_size_limit` from 8 to 1,000,000 for the whole process, which let a compiled
    ZeRO-3 model recompile at every step instead of settling (a 2-process test: 17 s -> 90 s)."""
    import torch._dynamo

    limit = torch._dynamo.config.cache_size_limit
    import timm.optim

    torch._dynamo.config.cache_size_limit = limit
    return timm.optim


def check_optimizer(name: str) -> None:
    """Raise ConfigError when timm has no optimizer called `name`."""
    known = timm_optim().list_optimizers()
    if name.lower() not in known:
        close = difflib.get_close_matches(name.lower(), known, n=5)
        raise ConfigError(
            f"optim.name: timm has no optimizer {name!r}" + (f" (similar: {', '.join(close)})" if close else "")
        )


def check_auto_augment(policy: str) -> None:
    """Raise ConfigError when timm cannot build the auto-augment `policy` (checked by building it)."""
    if not policy:
        return
    from timm.data.auto_augment import augment_and_mix_transform, auto_augment_transform, rand_augment_transform

    builders = {"rand": rand_augment_transform, "augmix": augment_and_mix_transform}
    name, *sections = policy.split("-")
    builder = builders.get(name, auto_augment_transform)  # timm's own dispatch
    try:
        # timm skips a rand / augmix section without a number ("rand-m9-foo"); a typo should not pass silently
        bad = [c for c in sections if name in builders and not re.search(r"\d", c) and not c.startswith("t")]
        assert not bad, f"section {bad[0]!r} has no value"
        builder(policy, {"translate_const": 100, "img_mean": (124, 116, 104)})
    except Exception as e:  # timm raises AssertionError / KeyError / ValueError for unknown parts
        raise ConfigError(
            f"augment.auto_augment: timm cannot build policy {policy!r} ({type(e).__name__}: {e}); "
            f"e.g. rand-m9-mstd0.5-inc1, augmix-m5-w4-d2, original, v0"
        ) from None
