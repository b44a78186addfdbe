"""Config checks that look names up in timm (models, optimizers, auto-augment policies). Kept apart from the
schema because timm takes seconds to import: a saved run directory's config is read back without them."""

from __future__ import annotations

import difflib
import re

from distrain.errors import ConfigError


def check_model_names(names: list[str]) -> None:
    """Raise ConfigError naming any model timm does not know, with similar names. Kept out of
    ModelConfig's own checks because timm's registry takes seconds to import: a saved run directory's
    config (checked when the run started) is read back without it."""
    import timm

    for name in names:
        if not timm.is_model(name):
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
