"""Single-device model construction: timm by name, randomly initialised or from pretrained weights.

Nothing here knows about ranks or wrappers; `distributed.wrap` applies gradient checkpointing, compile
and the data-parallel wrapper to what `create_model` returns, in that order.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

import timm
import torch

from distrain.config import Config, ModelConfig
from distrain.errors import ConfigError


def create_model(
    name: str,
    *,
    num_classes: int,
    in_chans: int,
    drop_rate: float = 0.0,
    drop_path_rate: float = 0.0,
    pretrained: bool = False,
    pretrained_file: str = "",
) -> torch.nn.Module:
    """A timm classifier: random init, timm's pretrained weights (`pretrained`, from the Hugging Face hub
    cache), or a local checkpoint (`pretrained_file`). timm re-makes the classifier when `num_classes`
    differs from the weights' and adapts the first convolution to `in_chans`. Raises ConfigError, in one
    line, when the weights cannot be had (offline and not cached, no such weights) or do not fit the model, and
    for a `drop_path_rate` the model does not take."""
    regularisation = {"drop_rate": drop_rate, **({"drop_path_rate": drop_path_rate} if drop_path_rate else {})}
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
                     pretrained_file=model.pretrained_file)  # fmt: skip


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
    memory = device_memory_bytes(device)
    for name in cfg.model.names:
        mcfg = cfg.for_model(name)
        sizes = {mcfg.data.image_size, *mcfg.data.image_size_schedule.values()}
        batches = {mcfg.train.batch_size, *mcfg.train.batch_size_schedule.values()}
        for size in sorted(sizes):
            batch_bytes = max(batches) * in_chans * size * size * 4  # float32 inputs, before any activation
            if batch_bytes > memory / 4:  # every backbone's activations are many times its input
                raise ConfigError(
                    f"data.image_size={size}: one batch of {max(batches)} x {in_chans} x {size} x {size} float32 "
                    f"inputs is {batch_bytes / 1e9:.3g} GB, more than a quarter of the {memory / 1e9:.3g} GB of "
                    f"{device.type} memory; lower data.image_size or train.batch_size"
                )
            _check_forward(name, size, in_chans, mcfg.data.num_classes)


def _check_forward(name: str, size: int, in_chans: int, num_classes: int) -> None:
    try:
        with torch.device("meta"):
            timm.create_model(name, num_classes=num_classes, in_chans=in_chans)(torch.empty(2, in_chans, size, size))
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0][:200]
        default = (
            timm.get_pretrained_cfg_value(name, "input_size") if hasattr(timm, "get_pretrained_cfg_value") else None
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
