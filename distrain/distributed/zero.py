"""DeepSpeed ZeRO: the DeepSpeed JSON checked against distrain's config, the engine, and plain fp32 weights.

- `load_deepspeed_config`: read a DeepSpeed JSON, refuse unknown keys (DeepSpeed itself silently ignores
  unknown top-level keys, so a typo like `gradient_cliping` would train without clipping), fill its
  "auto" values from `train.*` and refuse explicit values that disagree, naming both.
- `ZeroModel`: a model + optimizer under a DeepSpeed engine (ZeRO 1-3, fp16 loss scaling, bf16), a
  `Trainable` like `ddp.DDPModel`; its `full_state_dict` gathers the fp32 master
  weights of every rank's partition into one plain state dict that a timm model loads as is.

`distributed.wrap` builds it; nothing outside `distrain.distributed` imports DeepSpeed.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any, Optional

import torch

from distrain.config import TrainConfig
from distrain.distributed.base import Criterion, StepResult, Trainable
from distrain.errors import ConfigError

# Top-level keys DeepSpeed's config reader knows (deepspeed/runtime/config.py `_initialize_params` and
# the documented sections). DeepSpeed ignores any other top-level key without a word.
KNOWN_TOP_LEVEL_KEYS = frozenset(
    {
        "train_batch_size",
        "train_micro_batch_size_per_gpu",
        "gradient_accumulation_steps",
        "gradient_clipping",
        "zero_optimization",
        "fp16",
        "bf16",
        "bfloat16",
        "amp",
        "torch_autocast",
        "optimizer",
        "scheduler",
        "steps_per_print",
        "wall_clock_breakdown",
        "memory_breakdown",
        "dump_state",
        "disable_allgather",
        "communication_data_type",
        "seq_parallel_communication_data_type",
        "prescale_gradients",
        "gradient_predivide_factor",
        "sparse_gradients",
        "zero_allow_untested_optimizer",
        "zero_force_ds_cpu_optimizer",
        "activation_checkpointing",
        "flops_profiler",
        "tensorboard",
        "wandb",
        "csv_monitor",
        "comet",
        "comms_logger",
        "checkpoint",
        "data_types",
        "aio",
        "compile",
        "elasticity",
        "autotuning",
        "timers",
        "data_efficiency",
        "curriculum_learning",
        "pipeline",
        "graph_harvesting",
        "use_data_before_expert_parallelism",
        "load_universal_checkpoint",
        "use_node_local_storage",
        "dataloader_drop_last",
        "eigenvalue",
        "progressive_layer_drop",
        "quantize_training",
        "sparse_attention",
        "hybrid_engine",
        "nebula",
        "weight_quantization",
        "compression_training",
        "disable_python_gc",
    }
)
# Sections that distrain owns: it builds the optimizer (optim.*) and steps its own LR schedule.
OWNED_BY_DISTRAIN = {
    "optimizer": "optim.* (distrain builds AdamW and passes it to DeepSpeed)",
    "scheduler": "optim.schedule (distrain steps its own LR schedule)",
}


def load_deepspeed_config(path: str | Path, train: TrainConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config at `path` with "auto" resolved from `train`; raises ConfigError (one line,
    naming the file, the key and both values) for unknown keys and values that disagree with `train`."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"train.deepspeed: DeepSpeed config not found: {p} (relative paths start at {Path.cwd()})")
    try:
        raw = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{p}: malformed JSON at line {e.lineno}: {e.msg}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: expected a JSON object at top level")
    for key in raw:
        if key not in KNOWN_TOP_LEVEL_KEYS:
            raise ConfigError(f"{p}: unknown DeepSpeed key {key!r} (DeepSpeed would silently ignore it)")
        if key in OWNED_BY_DISTRAIN:
            raise ConfigError(f"{p}: remove {key!r}; it is set by {OWNED_BY_DISTRAIN[key]}")
    cfg = copy.deepcopy(raw)
    expected = {
        "train_micro_batch_size_per_gpu": ("train.batch_size", train.batch_size),
        "gradient_accumulation_steps": ("train.grad_accum_steps", train.grad_accum_steps),
        "train_batch_size": (
            f"train.batch_size x train.grad_accum_steps x {world_size} processes",
            train.batch_size * train.grad_accum_steps * world_size,
        ),
        "gradient_clipping": ("train.max_grad_norm", train.max_grad_norm),
    }
    for key, (ours, value) in expected.items():
        if key not in cfg or cfg[key] == "auto":
            cfg[key] = value
        elif cfg[key] != value:
            raise ConfigError(f"{p}: {key}={cfg[key]!r} disagrees with {ours}={value!r}")
    for section, wanted in (("fp16", train.precision == "fp16"), ("bf16", train.precision == "bf16")):
        node = cfg.setdefault(section, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{p}: {section}: expected an object, got {node!r}")
        if node.get("enabled", "auto") == "auto":
            node["enabled"] = wanted
        elif node["enabled"] != wanted:
            raise ConfigError(
                f"{p}: {section}.enabled={node['enabled']!r} disagrees with train.precision={train.precision!r}"
            )
    if "bfloat16" in cfg:
        raise ConfigError(f"{p}: use 'bf16', not its legacy spelling 'bfloat16'")
    _validate_sections(p, cfg)
    if train.batch_size_schedule:
        raise ConfigError(f"{p}: train.batch_size_schedule: DeepSpeed fixes the micro-batch size for the whole run "
                          f"(train_micro_batch_size_per_gpu); keep one train.batch_size under ZeRO")  # fmt: skip
    if train.ema_decay and zero_stage(cfg) == 3:
        raise ConfigError(f"{p}: train.ema_decay needs every rank to hold the full weights; ZeRO-3 partitions them "
                          f"(use ZeRO-2, or set train.ema_decay=0)")  # fmt: skip
    return cfg


def _validate_sections(path: Path, cfg: dict) -> None:
    """Check the sections DeepSpeed models with pydantic (which forbid unknown keys) by those models."""
    import pydantic
    from deepspeed.runtime.precision_config import DeepSpeedBF16Config, DeepSpeedFP16Config
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    for section, model in (
        ("zero_optimization", DeepSpeedZeroConfig),
        ("fp16", DeepSpeedFP16Config),
        ("bf16", DeepSpeedBF16Config),
    ):
        if section not in cfg:
            continue
        try:
            model(**cfg[section])
        except pydantic.ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(x) for x in err["loc"])
            raise ConfigError(f"{path}: {section}.{where}: {err['msg']}") from None
        except TypeError as e:
            raise ConfigError(f"{path}: {section}: {e}") from None
    stage = cfg.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"{path}: zero_optimization.stage={stage!r} (expected 0, 1, 2 or 3)")


def prepare_runtime() -> None:
    """Call before DeepSpeed opens its communication backend. On CPU, DeepSpeed JIT-compiles a
    shared-memory all-reduce kernel (about a minute of C++ build on every fresh machine) that only its
    *inference* all-reduce uses; training never calls it, so distrain declines it there. Set
    DISTRAIN_DEEPSPEED_SHM=1 to let DeepSpeed build it anyway."""
    import warnings

    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*is deprecated")  # DeepSpeed's call, not ours
    if torch.cuda.is_available() or os.environ.get("DISTRAIN_DEEPSPEED_SHM") == "1":
        return
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def low_precision_dtype(ds_config: dict) -> Optional[torch.dtype]:
    """fp16 or bf16 when the DeepSpeed config enables it, else None (fp32)."""
    if ds_config["fp16"]["enabled"]:
        return torch.float16
    return torch.bfloat16 if ds_config["bf16"]["enabled"] else None


def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


class ZeroModel(Trainable):
    """A timm model and its optimizer under a DeepSpeed engine. `micro_step` runs forward, backward and
    (at the end of each accumulation window) the optimizer step, with DeepSpeed doing accumulation,
    clipping and fp16 loss scaling as its config says."""

    def __init__(self, engine, single: torch.nn.Module, plain: torch.nn.Module, ds_config: dict, via: str):
        self.engine = engine
        self.via = via
        self.single = single  # the module inside the engine (partitioned under ZeRO-3)
        self.plain = plain  # a plain fp32 copy for evaluation, loaded from `full_state_dict()`
        self.stage = zero_stage(ds_config)
        self.input_dtype = low_precision_dtype(ds_config) or torch.float32

    def describe(self) -> str:
        n = self.engine.world_size
        return (
            f"DeepSpeed ZeRO-{self.stage} over {n} process{'es' if n > 1 else ''} via {self.via}, "
            f"{str(self.input_dtype).replace('torch.', '')}" + self.wrapping
        )

    def train(self) -> None:
        self.engine.train()

    def micro_step(self, images: torch.Tensor, labels: torch.Tensor, criterion: Criterion):
        logits = self.engine(images.to(self.input_dtype))
        loss = criterion(logits.float(), labels)
        boundary = self.engine.is_gradient_accumulation_boundary()  # asked before step() advances it
        self.engine.backward(loss)
        self.engine.step()
        if not boundary:
            return loss, logits, StepResult(False, False, None)
        norm = self.engine.get_global_grad_norm()
        norm = torch.as_tensor(0.0 if norm is None else float(norm))
        return loss, logits, StepResult(True, bool(self.engine.was_step_applied()), norm)

    @torch.no_grad()
    def sync_buffers(self) -> None:
        """Give every rank rank 0's buffers (BatchNorm running statistics), as DDP does at each forward.
        DeepSpeed leaves them per rank, so ranks would evaluate with different statistics and an engine
        checkpoint (which stores rank 0's) would not restore the others. Collective."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            for buf in self.single.buffers():
                dist.broadcast(buf.data, src=0)

    @torch.no_grad()
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Every parameter's full fp32 master copy (gathered from all ranks' partitions) and rank 0's
        buffers, on CPU, keyed as in the single-device model. Collective: every rank must call it."""
        from deepspeed.utils import safe_get_full_fp32_param

        self.sync_buffers()
        params = dict(self.single.named_parameters())
        out = {}
        for name, value in self.single.state_dict(keep_vars=True).items():
            if name in params:
                full = safe_get_full_fp32_param(params[name])
                if full is None:  # no ZeRO partitioning and no low-precision copy: the parameter is the master
                    full = params[name]
                out[name] = full.detach().float().cpu().clone()
            else:  # buffers: fp32 like the parameters (they follow the engine's dtype in fp16 / bf16)
                value = value.detach().cpu()
                out[name] = value.float() if value.is_floating_point() else value.clone()
        return out

    def current_weights(self) -> torch.nn.Module:
        """The engine's module: every rank holds the full (fp32, or bf16 / fp16 working) weights under ZeRO-1/2."""
        assert self.stage < 3, "ZeRO-3 partitions the weights (refused with train.ema_decay when the config is read)"
        return self.single

    def eval_model(self) -> torch.nn.Module:
        """The plain fp32 copy with the current weights (collective)."""
        self.plain.load_state_dict(self.full_state_dict())
        return self.plain

    def save(self, directory: Path, tag: str) -> dict:
        """Save the engine's sharded state (weights, optimizer partitions, loss scaler) under directory/tag.
        Collective. Returns what the rank-0 checkpoint file records about it."""
        self.sync_buffers()
        self.engine.save_checkpoint(str(directory), tag=tag, save_latest=False)
        return {"deepspeed_tag": tag}

    def load(self, directory: Path, saved: dict) -> None:
        tag = saved.get("deepspeed_tag")
        if not tag or not (directory / tag).is_dir():
            raise FileNotFoundError(f"DeepSpeed checkpoint {directory / str(tag)} is missing")
        self.engine.load_checkpoint(str(directory), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=False)


def create_zero_model(
    single: torch.nn.Module,
    plain: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    ds_config: dict,
    accelerator: Optional[Any] = None,
    *,
    compile_backend: Optional[str] = None,
) -> ZeroModel:
    """Wrap with DeepSpeed: through accelerate's DeepSpeed plugin when `accelerator` runs one
    (`accelerate launch` with a DeepSpeed YAML), else `deepspeed.initialize` on the process group
    accelerate already opened (torchrun or the `deepspeed` launcher). With `compile_backend`, the engine
    then compiles its module in place (`engine.compile`, DeepSpeed's supported way to combine
    torch.compile with ZeRO)."""
    if accelerator is not None:
        engine, _ = accelerator.prepare(single, optimizer)
    else:
        import deepspeed

        engine, _, _, _ = deepspeed.initialize(model=single, optimizer=optimizer, config=ds_config)
    if compile_backend:
        engine.compile(backend=compile_backend)
    plain.to(engine.device)
    low = low_precision_dtype(ds_config)
    if low is not None:
        # DeepSpeed casts parameters to fp16/bf16 but leaves buffers in fp32; BatchNorm then refuses
        # (weights and running statistics must share a dtype), so its statistics follow the parameters.
        for buf in single.buffers():
            if buf.is_floating_point():
                buf.data = buf.data.to(low)
    return ZeroModel(
        engine,
        single,
        plain,
        ds_config,
        "accelerate's DeepSpeed plugin" if accelerator is not None else "deepspeed.initialize",
    )
