"""Gradient (activation) checkpointing of a timm model (or any module: a factory's own network), stem included,
without double-counted BatchNorm statistics. The first step of `distributed.wrap`: it rewrites module forwards that
compile then traces. `distrain.training.models.check_grad_checkpointing` checks a model by name before any work.
"""

from __future__ import annotations

import itertools
import re
from collections import Counter

import torch
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint


def apply_grad_checkpointing(model: torch.nn.Module, *, stem: bool = True) -> str:
    """Recompute activations in the backward pass instead of storing them. Uses timm's
    `set_grad_checkpointing` where the model implements it ("timm"); otherwise wraps each top-level
    stage (a child module that has sub-modules and is not the classifier) in torch.utils.checkpoint
    ("stages"). Raises ValueError for a model that offers neither.

    timm leaves the stem (the full-resolution layers before the first stage) outside its checkpoints,
    yet at high resolution those are the largest activations; with `stem=True` they become one more
    checkpointed segment ("timm+stem"). Under ZeRO-3 the fused segment reads the later stem modules'
    partitioned parameters outside their own forward hooks; DeepSpeed gathers such parameters on
    access ("external parameters"), which tests/test_zero.py checks with every parameter partitioned."""
    stem_modules = find_stem(model) if stem else []
    try:
        model.set_grad_checkpointing(True)
    except (AttributeError, NotImplementedError, AssertionError):
        head = model.get_classifier() if hasattr(model, "get_classifier") else None
        stages = [
            child
            for child in model.children()
            if child is not head and any(True for _ in child.children()) and any(True for _ in child.parameters())
        ]
        if not stages:
            raise ValueError(
                f"model {type(model).__name__} supports no gradient checkpointing: timm's "
                f"set_grad_checkpointing is missing and it has no top-level stages to wrap"
            ) from None
        for stage in stages:
            _checkpoint_forward(stage)
        how = "stages"
    else:
        if stem_modules:
            _checkpoint_chain(stem_modules)
        how = "timm+stem" if stem_modules else "timm"
    _update_running_stats_once(model)
    return how


def find_stem(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's stem: the top-level children that run first, each called once on the previous one's
    output (the first on the model's input), whose parameters all belong to timm's "stem" parameter
    group (`group_matcher`; parameter-free children such as an activation or a max-pool continue the
    chain). Found by tracing one forward with meta-device weights and input, so it costs no compute or
    memory. [] when the model has no string stem pattern, the trace fails, or the chain is one leaf
    module (nothing stored inside it to save)."""
    try:
        pattern = model.group_matcher().get("stem")
    except (AttributeError, NotImplementedError):
        return []
    if not isinstance(pattern, str):
        return []
    stem_regex = re.compile(pattern)
    first_conv = next((m for m in model.modules() if isinstance(m, torch.nn.Conv2d)), None)
    if first_conv is None:
        return []
    size = tuple((getattr(model, "pretrained_cfg", None) or {}).get("input_size", (3, 224, 224)))[-2:]
    x = torch.empty(2, first_conv.in_channels, *size, device="meta")
    children = dict(model.named_children())
    calls: list[tuple[str, tuple, object]] = []
    hooks = [
        child.register_forward_hook(lambda mod, args, out, n=name: calls.append((n, args, out)))
        for name, child in children.items()
    ]
    meta_state = {
        k: torch.empty_like(v, device="meta")
        for k, v in itertools.chain(model.named_parameters(), model.named_buffers())
    }
    training = model.training
    try:
        model.eval()  # batch statistics on meta tensors are fine, but eval avoids touching running stats
        with torch.no_grad():
            functional_call(model, meta_state, (x,))
    except Exception:  # a model that cannot run on meta: no stem checkpointing, everything else unchanged
        return []
    finally:
        for h in hooks:
            h.remove()
        model.train(training)
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    counts = Counter(name for name, _, _ in calls)
    chain, previous = [], x
    for name, args, out in calls:
        module = children[name]
        in_stem = all(stem_regex.match(f"{name}.{p}") for p, _ in module.named_parameters())
        if (
            module is head
            or counts[name] != 1
            or not in_stem
            or len(args) != 1
            or args[0] is not previous
            or not isinstance(out, torch.Tensor)
        ):
            break
        chain.append(module)
        previous = out
    if len(chain) == 1 and not any(True for _ in chain[0].children()):
        return []
    return chain


def _checkpoint_chain(modules: list[torch.nn.Module]) -> None:
    """Run `modules` (a chain: each feeds the next) as one checkpointed segment, keeping the model's
    structure and state-dict keys: while training with grad, the first module's forward runs the whole
    chain under torch.utils.checkpoint and the others pass their input through; otherwise each runs its
    own forward."""
    first = modules[0]
    forwards = [m.forward for m in modules]

    def run_chain(x):
        for module, f in zip(modules, forwards):
            # Own forwards, not __call__ (the others' __call__ passes through): so no hooks fire here,
            # and the recomputation must set running statistics aside itself.
            _set_aside_running_stats(module)
            try:
                x = f(x)
            finally:
                _restore_running_stats(module)
        return x

    def active() -> bool:
        return first.training and torch.is_grad_enabled()

    def first_forward(x):
        return checkpoint(run_chain, x, use_reentrant=False) if active() else forwards[0](x)

    first.forward = first_forward
    for module, own in zip(modules[1:], forwards[1:]):
        module.forward = lambda x, own=own: x if active() else own(x)


def _update_running_stats_once(model: torch.nn.Module) -> None:
    """Keep recomputation from updating normalisation running statistics a second time.

    A checkpointed segment runs its forward again during backward, in training mode, so every
    BatchNorm inside it would fold the same batch into running_mean / running_var twice and count
    num_batches_tracked twice (pytorch/pytorch#96136): the eval-mode model would then differ from one
    trained without checkpointing. Hooks on the norm layers cover timm's own internal checkpoint calls
    as well as distrain's segments; `always_call` restores the buffers even when non-reentrant
    checkpointing stops a recomputation early by raising from inside the layer."""
    for module in model.modules():
        if _tracks_running_stats(module):
            module.register_forward_pre_hook(_set_aside_running_stats)
            module.register_forward_hook(_restore_running_stats, always_call=True)


_RUNNING_STATS = ("running_mean", "running_var", "num_batches_tracked")


def _tracks_running_stats(module: torch.nn.Module) -> bool:
    return bool(getattr(module, "track_running_stats", False)) and getattr(module, "running_mean", None) is not None


def _set_aside_running_stats(module: torch.nn.Module, args=None) -> None:
    """In a recomputation (a training forward run inside the autograd backward pass: the same test
    torch's module tracker and FSDP use), let `module` update throwaway copies of its running
    statistics, so that it computes and saves exactly what the first forward did (checkpointing checks
    that) while its buffers keep the first forward's update only."""
    if module.training and _tracks_running_stats(module) and torch._C._current_graph_task_id() != -1:
        kept = {n: getattr(module, n) for n in _RUNNING_STATS if getattr(module, n, None) is not None}
        module.__dict__["_distrain_kept_stats"] = kept
        for n, buffer in kept.items():
            setattr(module, n, buffer.clone())


def _restore_running_stats(module: torch.nn.Module, args=None, output=None) -> None:
    for n, buffer in module.__dict__.pop("_distrain_kept_stats", {}).items():
        setattr(module, n, buffer)


def _checkpoint_forward(module: torch.nn.Module) -> None:
    """Make `module` recompute its forward during backward when training with grad enabled."""
    inner = module.forward

    def forward(*args, **kwargs):
        if module.training and torch.is_grad_enabled():
            # Non-reentrant: works with inputs that do not require grad and with DDP / ZeRO hooks.
            return checkpoint(inner, *args, use_reentrant=False, **kwargs)
        return inner(*args, **kwargs)

    module.forward = forward
