"""Single-device model construction: timm by name or the user's own factory (`package.module:function`),
randomly initialised or from pretrained weights.

Nothing here knows about ranks or wrappers; `distributed.wrap` applies gradient checkpointing, compile
and the data-parallel wrapper to what `create_model` returns, in that order.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import timm
import torch

from distrain.config import Config, ModelConfig
from distrain.config.lookups import import_factory, is_factory_name
from distrain.distributed.checkpointing import apply_grad_checkpointing
from distrain.errors import ConfigError
from distrain.tasks import get_task


def create_model(
    name: str,
    *,
    num_classes: int,
    in_chans: int,
    drop_rate: float = 0.0,
    drop_path_rate: float = 0.0,
    pretrained: bool = False,
    pretrained_file: str = "",
    factory_args: dict[str, Any] | None = None,
    **architecture: Any,
) -> torch.nn.Module:
    """A timm classifier: random init, timm's pretrained weights (`pretrained`, from the Hugging Face hub
    cache), or a local checkpoint (`pretrained_file`). timm re-makes the classifier when `num_classes`
    differs from the weights' and adapts the first convolution to `in_chans`. Raises ConfigError, in one
    line, when the weights cannot be had (offline and not cached, no such weights) or do not fit the model, and
    for a `drop_path_rate` the model does not take.

    A `package.module:function` name is the user's own factory, called as `function(num_classes=num_classes,
    in_chans=in_chans, **kwargs)`: kwargs are drop_rate / drop_path_rate where non-zero, then `factory_args`
    (model.factory_args[name]). See `create_factory_model`.

    `architecture`: keyword arguments of the network's shape, given to timm and to a factory alike; a dense task's
    backbone is built with `features_only=True` (timm's feature-map extractor; a factory returns a module with a
    timm-style `feature_info`)."""
    if is_factory_name(name):
        if pretrained and not pretrained_file:
            raise ConfigError(f"model.pretrained: {name!r} is your own factory: there are no hub weights for it; "
                              "set model.pretrained_file to a state dict instead")  # fmt: skip
        kwargs = {k: v for k, v in (("drop_rate", drop_rate), ("drop_path_rate", drop_path_rate)) if v}
        model = create_factory_model(name, num_classes=num_classes, in_chans=in_chans,
                                     kwargs={**kwargs, **architecture, **(factory_args or {})})  # fmt: skip
        if pretrained_file:
            load_factory_weights(model, name, pretrained_file)
        return model
    regularisation = {
        "drop_rate": drop_rate,
        **({"drop_path_rate": drop_path_rate} if drop_path_rate else {}),
        **architecture,
    }
    if not (pretrained or pretrained_file):
        try:
            return timm.create_model(name, num_classes=num_classes, in_chans=in_chans, **regularisation)
        except TypeError as e:
            raise ConfigError(f"model {name!r} cannot be built with {regularisation} ({e})") from None
    overlay = {"pretrained_cfg_overlay": {"file": str(pretrained_file)}} if pretrained_file else {}
    source = f"model.pretrained_file={pretrained_file}" if pretrained_file else "model.pretrained=true"
    with _missing_keys_reported() as missing:
        try:
            model = timm.create_model(name, pretrained=True, num_classes=num_classes, in_chans=in_chans,
                                      **regularisation, **overlay)  # fmt: skip
        except Exception as e:
            first = (str(e).strip().splitlines() or [""])[0][:300]
            hint = "" if pretrained_file else " (offline? fill the hub cache first, or set model.pretrained_file)"
            raise ConfigError(f"{source}: cannot load {name!r} weights: {type(e).__name__}: {first}{hint}") from None
    not_loaded = [k for k in missing if not _may_be_reinitialised(k, model.pretrained_cfg)]
    if not_loaded:
        raise ConfigError(f"{source}: {len(not_loaded)} of {len(model.state_dict())} tensors of {name!r} are not in "
                          f"the weights (e.g. {not_loaded[0]!r}); are they another architecture's?")  # fmt: skip
    return model


def create_factory_model(name: str, *, num_classes: int, in_chans: int, kwargs: dict[str, Any]) -> torch.nn.Module:
    """The network the factory `name` (`package.module:function`) builds, called as
    `function(num_classes=num_classes, in_chans=in_chans, **kwargs)`. Raises ConfigError, in one line naming the
    entry, when it does not import, raises, or returns something other than a torch.nn.Module."""
    factory = import_factory(name)
    call = ", ".join(f"{k}={v!r}" for k, v in {"num_classes": num_classes, "in_chans": in_chans, **kwargs}.items())
    try:
        model = factory(num_classes=num_classes, in_chans=in_chans, **kwargs)
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise ConfigError(
            f"model.names: {name!r} raised {type(e).__name__} ({first}) when called with {call}"
        ) from None
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"model.names: {name!r} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def load_factory_weights(model: torch.nn.Module, name: str, path: str) -> None:
    """Load the state dict in `path` (safetensors or torch, read by timm's loader: a `state_dict` or `model` entry
    of a training checkpoint is found) into the factory-built `model`, strictly except for its classifier (the
    `classifier` of its pretrained_cfg / default_cfg, else what `get_classifier()` returns, else its last Linear
    layer), which keeps the factory's initialisation where the file's is absent or of another shape (another
    number of classes). Raises ConfigError, in one line, for a file that cannot be read or does not fit."""
    source = f"model.pretrained_file={path}"
    try:
        weights = timm.models.load_state_dict(str(path))
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise ConfigError(f"{source}: cannot read {type(e).__name__}: {first}") from None
    own = model.state_dict()
    head = tuple(p + "." for p in _classifier_prefixes(model))
    reshaped = [k for k in own if k in weights and weights[k].shape != own[k].shape]
    weights = {k: v for k, v in weights.items() if not (k in reshaped and k.startswith(head))}
    problems = []
    missing = [k for k in own if k not in weights and not k.startswith(head) and not k.endswith("num_batches_tracked")]
    if missing:
        problems.append(f"{len(missing)} missing from the file (e.g. {missing[0]!r})")
    unexpected = [k for k in weights if k not in own]
    if unexpected:
        problems.append(f"{len(unexpected)} not in the model (e.g. {unexpected[0]!r})")
    reshaped = [k for k in reshaped if not k.startswith(head)]
    if reshaped:
        k = reshaped[0]
        problems.append(f"{len(reshaped)} of another shape (e.g. {k!r}: {list(weights[k].shape)} in the file, "
                        f"{list(own[k].shape)} in the model)")  # fmt: skip
    if problems:
        raise ConfigError(f"{source}: the weights do not fit {name!r}: tensors {'; '.join(problems)}")
    model.load_state_dict(weights, strict=False)  # strict but for the head and BatchNorm step counters, checked above


def _classifier_prefixes(model: torch.nn.Module) -> list[str]:
    """The module names of `model`'s classifier (see `load_factory_weights`)."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    named = cfg.get("classifier") if isinstance(cfg, dict) else getattr(cfg, "classifier", None)
    if named:
        return [named] if isinstance(named, str) else list(named)
    modules = dict(model.named_modules())
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    found = [n for n, m in modules.items() if m is head and n] or [
        n for n, m in modules.items() if isinstance(m, torch.nn.Linear)
    ][-1:]
    return found


def model_settings(model: ModelConfig, name: str) -> dict[str, Any]:
    """`create_model`'s settings of `name` from the model section, weights aside: regularisation and, for a factory,
    its `factory_args` (what the registered model records to rebuild the same network)."""
    settings: dict[str, Any] = {"drop_rate": model.drop_rate, "drop_path_rate": model.drop_path_rate}
    if is_factory_name(name):
        settings["factory_args"] = dict(model.factory_args.get(name, {}))
    return settings


def create_meta_model(name: str, *, num_classes: int, in_chans: int, settings: dict[str, Any]) -> torch.nn.Module:
    """`create_model(name, ..., **settings)` without weights in memory (on the meta device), to check a model's
    structure and input size at no cost. A model whose constructor computes on tensors cannot be built there: it is
    built on the CPU (where its own errors, if any, surface as ConfigError)."""
    return on_meta(functools.partial(create_model, name, num_classes=num_classes, in_chans=in_chans, **settings))


def on_meta(build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """`build()` on the meta device, or on the CPU when the model's constructor computes on tensors."""
    try:
        with torch.device("meta"):
            return build()
    except Exception:
        return build()


def check_grad_checkpointing(name: str, model: ModelConfig | None = None) -> str:
    """Which checkpointing `name` would get ("timm", "timm+stem" or "stages"), found on a weightless meta-device
    copy (built with `model`'s settings for it) so that a model offering neither is refused before any work.
    Raises ConfigError."""
    settings = model_settings(model, name) if model is not None else {}
    built = create_meta_model(name, num_classes=2, in_chans=3, settings=settings)
    try:
        return apply_grad_checkpointing(built)
    except ValueError as e:
        raise ConfigError(f"model.names: {name!r}: {e}; set model.grad_checkpointing=false") from None


def _may_be_reinitialised(key: str, pretrained_cfg: dict) -> bool:
    """The classifier (re-made for num_classes) and BatchNorm step counters may be absent from the weights."""
    classifiers = pretrained_cfg.get("classifier") or ()
    classifiers = (classifiers,) if isinstance(classifiers, str) else classifiers
    return key.endswith("num_batches_tracked") or any(key.startswith(c + ".") for c in classifiers)


@contextlib.contextmanager
def _missing_keys_reported() -> Iterator[list[str]]:
    """The keys timm's loader reports missing. It loads non-strictly whenever it re-makes the classifier, so a
    checkpoint of another architecture would otherwise leave the whole model randomly initialised, silently."""
    missing: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            match = re.match(r"Missing keys \((.*)\) discovered", record.getMessage())
            if match:
                missing.extend(k.strip() for k in match.group(1).split(","))

    logger = logging.getLogger("timm.models._builder")
    handler, level = Collect(level=logging.INFO), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield missing
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def check_pretrained(model: ModelConfig, *, num_classes: int, in_chans: int) -> None:
    """Load each backbone's pretrained weights once before any job starts (filling the hub cache), so that
    weights that cannot be had or do not fit are refused up front. Nothing to do without pretrained weights."""
    if not (model.pretrained or model.pretrained_file):
        return
    for name in model.names:
        create_model(name, num_classes=num_classes, in_chans=in_chans, pretrained=model.pretrained,
                     pretrained_file=model.pretrained_file, **model_settings(model, name))  # fmt: skip


def create_ema(model: torch.nn.Module, decay: float, warmup: bool):
    """timm's ModelEmaV3 over a copy of `model`, kept in fp32 (a bf16 EMA would round most updates away);
    `update(weights, step)` after each optimizer step. None when decay is 0."""
    if not decay:
        return None
    from timm.utils import ModelEmaV3

    return ModelEmaV3(model, decay=decay, use_warmup=warmup, warmup_power=0.75, dtype=torch.float32)


def check_inputs(cfg: Config, in_chans: int, device: torch.device) -> None:
    """Refuse, before any job starts, a model that cannot take the input size (a forward pass on the meta
    device: no memory, no time) and a batch of inputs that alone would fill the device's memory."""
    memory, task = device_memory_bytes(device), get_task(cfg.task)
    for name in cfg.model.names:
        mcfg = cfg.for_model(name)
        sizes = {mcfg.data.image_size, *mcfg.data.image_size_schedule.values()}
        batches = {mcfg.train.batch_size, *mcfg.train.batch_size_schedule.values()}
        # a factory's own errors (it raises, returns no Module) are refused here, where the channels are known
        make = functools.partial(create_model, name, **model_settings(mcfg.model, name))
        model = on_meta(functools.partial(task.build_model, make, mcfg.data.num_classes, in_chans,
                                          mcfg.model.head_settings()))  # fmt: skip
        channels = in_chans * task.images_per_sample  # an image pair's two, stacked on channels
        for size in sorted(sizes):
            batch_bytes = max(batches) * channels * size * size * 4  # float32 inputs, before any activation
            if batch_bytes > memory / 4:  # every backbone's activations are many times its input
                raise ConfigError(
                    f"data.image_size={size}: one batch of {max(batches)} x {channels} x {size} x {size} float32 "
                    f"inputs is {batch_bytes / 1e9:.3g} GB, more than a quarter of the {memory / 1e9:.3g} GB of "
                    f"{device.type} memory; lower data.image_size or train.batch_size"
                )
            _check_forward(name, model, size, channels)


def _check_forward(name: str, model: torch.nn.Module, size: int, in_chans: int) -> None:
    # meta, unless the model could only be built on the CPU (create_meta_model); tensors the forward makes go there too
    device = next(iter(model.parameters()), torch.empty(0, device="meta")).device
    try:
        with torch.device(device), torch.no_grad():
            model(torch.empty(2, in_chans, size, size))
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0][:200]
        default = (
            timm.get_pretrained_cfg_value(name, "input_size")
            if hasattr(timm, "get_pretrained_cfg_value") and not is_factory_name(name)
            else None
        )
        hint = f"; its default input is {default[-1]} px" if default else ""
        raise ConfigError(f"model {name!r} cannot take {size} px inputs ({type(e).__name__}: {first}){hint}") from None


def device_memory_bytes(device: torch.device) -> int:
    """The memory one process can use on `device`: the GPU's, else the machine's RAM (its cgroup limit if lower)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        limit = int(Path("/sys/fs/cgroup/memory.max").read_text().strip())
    except (OSError, ValueError):  # no cgroup v2 limit ("max") or not Linux
        return ram
    return min(ram, limit)
