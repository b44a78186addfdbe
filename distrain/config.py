"""Typed experiment configuration: YAML in, validated dataclasses out.

Every field has a type and a one-line meaning. `load_config` refuses unknown keys, wrong
types and impossible values *before any work starts*, raising `ConfigError` with one line
that names the key and the value. Command-line overrides are `a.b=value` strings whose
values are parsed as YAML scalars (so `train.epochs=3`, `cv.seeds=[1,2]`, `train.precision=bf16`).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from distrain.errors import ConfigError
from distrain.tasks import LOSSES, METRICS, TASKS, losses_for, metric_fits, metrics_for


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


PRECISIONS = ("no", "fp16", "bf16")
SCHEDULES = ("cosine", "cosine_restarts", "constant")
DATA_SOURCES = ("digits", "digits_binary", "digits_multilabel", "shards")
DIGITS_TASKS = {"digits": ("multiclass", 10), "digits_binary": ("binary", 2), "digits_multilabel": ("multilabel", 4)}
"""The task and data.num_classes each built-in digits source is labelled for."""
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos")


@dataclass(kw_only=True)
class DataConfig:
    source: str = "digits"
    """`digits` (scikit-learn's bundled digits, written as shards on first use), `digits_binary` (the same
    images labelled 'is it an 8?': a binary task with 9.7% positives), `digits_multilabel` (each image labelled
    with its digit's properties: even, large (>= 5), loop, prime) or `shards` (packed with `distrain data pack`)."""
    root: str = "data/digits"
    """Directory holding the shards and their `index.json`."""
    image_size: int = 32
    """Model input: image_size x image_size pixels (the shorter side resized to image_size / crop_pct,
    keeping the aspect ratio, then centre-cropped)."""
    image_size_schedule: dict[int, int] = field(default_factory=dict)
    """Progressive resolution: training epoch -> image size from that epoch on, e.g. {0: 640, 4: 960}; epochs
    increasing from 0, the last size data.image_size (validation, OOF and test always run at data.image_size).
    Empty: every epoch at data.image_size."""
    interpolation: str = ""
    """Resize filter: nearest, bilinear, bicubic or lanczos; empty: the backbone's timm data config."""
    crop_pct: float = 0.0
    """Centre-crop fraction (1.0: no crop); 0: the backbone's timm data config (e.g. 0.875 or 0.95)."""
    mean: list[float] = field(default_factory=list)
    """Per-channel mean of pixel values in [0, 1] (1 or `channels` values); empty: the backbone's timm
    data config (ImageNet's for most; averaged to one value for grayscale data)."""
    std: list[float] = field(default_factory=list)
    """Per-channel standard deviation, as `mean`."""
    num_classes: int = 10
    """Number of classes (multilabel: of labels); every label must lie in [0, num_classes)."""
    num_workers: int = -1
    """DataLoader worker processes per rank that read, decode and augment samples; -1: the CPUs this process
    may use divided by this node's processes (at most one per shard a rank reads)."""
    shuffle_buffer: int = 1000
    """Samples (shard offsets, not images) held in the training shuffle buffer."""
    cache_mb: float = 512.0
    """Keep evaluation-decoded images in memory, per process, when the whole data set fits in this many MB
    (samples x channels x image_size^2 bytes: the 1,797 digits at 32 px take 1.8 MB, 100k images at 224 px
    15 GB); else nothing decoded is kept. Training images are cached too when augment.enabled is false.
    Each DataLoader worker keeps its own share. 0 disables."""

    def __post_init__(self):
        _require(self.source in DATA_SOURCES, "data.source", self.source, f"one of {DATA_SOURCES}")
        _require(self.image_size >= 8, "data.image_size", self.image_size, ">= 8")
        _require(self.num_classes >= 2, "data.num_classes", self.num_classes, ">= 2")
        _require(self.num_workers >= -1, "data.num_workers", self.num_workers, ">= 0, or -1 for one per CPU")
        _require(self.shuffle_buffer >= 1, "data.shuffle_buffer", self.shuffle_buffer, ">= 1")
        _require(self.cache_mb >= 0, "data.cache_mb", self.cache_mb, ">= 0")
        _require(self.interpolation in ("", *INTERPOLATIONS), "data.interpolation", self.interpolation,
                 f"one of {INTERPOLATIONS}")  # fmt: skip
        _require(0.0 <= self.crop_pct <= 1.0, "data.crop_pct", self.crop_pct, "in (0, 1], or 0 for the model's")
        _require(len(self.mean) in (0, 1, 3), "data.mean", self.mean, "1 or 3 values, or none for the model's")
        _require(len(self.std) in (0, 1, 3), "data.std", self.std, "1 or 3 values, or none for the model's")
        _require(all(v > 0 for v in self.std), "data.std", self.std, "values > 0")


@dataclass(kw_only=True)
class AugmentConfig:
    """Training augmentation, built by timm: `timm.data.create_transform` per sample in the DataLoader workers
    (random-resized crop, flips, colour jitter or auto-augment), random erasing and Mixup / CutMix per batch
    on the training device. Evaluation never augments."""

    enabled: bool = True
    """Augment training samples; false: training sees the evaluation transform (resize, centre crop)."""
    scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    """Random-resized crop: the crop's area as a fraction of the image's, [min, max]."""
    ratio: list[float] = field(default_factory=lambda: [0.75, 1.3333333])
    """Random-resized crop: the crop's aspect ratio (width / height), [min, max]."""
    hflip: float = 0.5
    """Probability of a horizontal flip (0 for digits and text)."""
    vflip: float = 0.0
    """Probability of a vertical flip (e.g. 0.5 for satellite or microscope images)."""
    color_jitter: float = 0.4
    """Brightness, contrast and saturation jitter strength; 0 disables. Ignored when auto_augment is set."""
    auto_augment: str = ""
    """timm auto-augment policy, e.g. `rand-m9-mstd0.5-inc1` (RandAugment), `augmix-m5-w4-d2`,
    `original`, `v0`; empty disables."""
    re_prob: float = 0.0
    """Random erasing: probability per image (applied per batch on the device, as timm's prefetcher does)."""
    re_mode: str = "pixel"
    """Random erasing fill: `pixel` (per-pixel noise), `rand` (per-channel colour) or `const` (zeros)."""
    re_count: int = 1
    """Random erasing: at most this many boxes per image."""
    mixup: float = 0.0
    """Mixup alpha (timm.data.Mixup); 0 disables. Mixup / CutMix train with soft targets (label smoothing
    folded in) and need an even train.batch_size."""
    cutmix: float = 0.0
    """CutMix alpha; 0 disables."""
    mix_prob: float = 1.0
    """Probability that a batch is mixed at all (when mixup or cutmix is on)."""
    switch_prob: float = 0.5
    """With both mixup and cutmix on: probability of CutMix instead of Mixup for a batch."""

    def __post_init__(self):
        for key, pair, low in (("augment.scale", self.scale, 0.0), ("augment.ratio", self.ratio, 0.0)):
            _require(len(pair) == 2 and low < pair[0] <= pair[1], key, pair, f"[min, max] with {low} < min <= max")
        _require(self.scale[1] <= 1.0, "augment.scale", self.scale, "max <= 1")
        for key in ("hflip", "vflip", "re_prob", "mix_prob", "switch_prob"):
            value = getattr(self, key)
            _require(0.0 <= value <= 1.0, f"augment.{key}", value, "a probability in [0, 1]")
        for key in ("color_jitter", "mixup", "cutmix"):
            _require(getattr(self, key) >= 0, f"augment.{key}", getattr(self, key), ">= 0")
        _require(self.re_mode in ("pixel", "rand", "const"), "augment.re_mode", self.re_mode,
                 "one of ('pixel', 'rand', 'const')")  # fmt: skip
        _require(self.re_count >= 1, "augment.re_count", self.re_count, ">= 1")

    @property
    def mixes(self) -> bool:
        """Mixup or CutMix is on: training targets are soft."""
        return self.enabled and (self.mixup > 0 or self.cutmix > 0) and self.mix_prob > 0


@dataclass(kw_only=True)
class TTAConfig:
    """Test-time augmentation: softmax probabilities averaged over views of each image, for the OOF and test
    predictions (every epoch's validation included), `distrain predict` and the registered model alike."""

    hflip: bool = False
    """Add the horizontally mirrored image."""
    vflip: bool = False
    """Add the vertically mirrored image."""
    scales: list[float] = field(default_factory=list)
    """Add the image resized by each factor, e.g. [1.15] (CNNs; a ViT without dynamic_img_size refuses other
    sizes)."""

    def __post_init__(self):
        for s in self.scales:
            _require(0.25 <= s <= 4 and s != 1.0, "tta.scales", self.scales, "factors in [0.25, 4] other than 1")


@dataclass(kw_only=True)
class CVConfig:
    folds: int = 5
    """Number of cross-validation folds (K)."""
    fold_seed: int = 0
    """Seed of the stratified K-fold split; the fold manifest depends on it and on the data only."""
    seeds: list[int] = field(default_factory=lambda: [42, 43])
    """Training seeds; every (model, seed) is trained on every fold."""
    only_folds: list[int] = field(default_factory=list)
    """If non-empty, train only these folds (for quick trials); OOF then covers only them. With a single
    fold, weighted voting and stacking (fitted on other folds' OOF rows) are skipped, with the reason."""

    def __post_init__(self):
        _require(self.folds >= 2, "cv.folds", self.folds, ">= 2")
        _require(len(self.seeds) >= 1, "cv.seeds", self.seeds, "at least one seed")
        _require(len(set(self.seeds)) == len(self.seeds), "cv.seeds", self.seeds, "distinct seeds")
        for f in self.only_folds:
            _require(0 <= f < self.folds, "cv.only_folds", self.only_folds, f"fold ids in [0, {self.folds})")


@dataclass(kw_only=True)
class ModelConfig:
    names: list[str] = field(default_factory=lambda: ["resnet10t"])
    """timm model names; each is a backbone of the ensemble."""
    pretrained: bool = False
    """Start from timm's pretrained weights (downloaded from the Hugging Face hub into its cache once;
    with HF_HUB_OFFLINE=1 only the cache is used). The classifier is re-made for data.num_classes and the
    first convolution adapted to the data's channels, as timm does."""
    pretrained_file: str = ""
    """A local checkpoint (.safetensors, .pth, .bin) to start from instead of the hub (timm's
    pretrained_cfg_overlay file=...); implies pretrained. One model name only."""
    drop_rate: float = 0.0
    """Dropout before the classifier."""
    drop_path_rate: float = 0.0
    """Stochastic depth (timm's drop_path_rate), e.g. 0.1-0.2 when fine-tuning ConvNeXt; 0 disables."""
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per-backbone settings: model name -> {dotted key: value} for keys of optim, train (not metric), augment, tta,
    data.image_size / interpolation / crop_pct / mean / std and model.drop_rate / drop_path_rate /
    grad_checkpointing; e.g. `convnext_tiny: {optim.lr: 4.5e-4, optim.weight_decay: 8.5e-5}`."""
    grad_checkpointing: bool = False
    """Trade compute for activation memory: timm's set_grad_checkpointing where the model has it, else
    torch.utils.checkpoint around each top-level stage."""

    def __post_init__(self):
        _require(len(self.names) >= 1, "model.names", self.names, "at least one model")
        _require(0.0 <= self.drop_rate < 1.0, "model.drop_rate", self.drop_rate, "in [0, 1)")
        _require(0.0 <= self.drop_path_rate < 1.0, "model.drop_path_rate", self.drop_path_rate, "in [0, 1)")
        if self.pretrained_file:
            _require(len(self.names) == 1, "model.pretrained_file", self.pretrained_file,
                     "a file for a single model name (model.names has several)")  # fmt: skip


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


@dataclass(kw_only=True)
class OptimConfig:
    name: str = "adamw"
    """timm optimizer (timm.optim.list_optimizers()): adamw, adam, sgd (Nesterov momentum), momentum, lamb,
    lion, ... built by timm's create_optimizer_v2."""
    lr: float = 2e-3
    """Peak learning rate (per optimizer step, not scaled by world size)."""
    momentum: float = 0.9
    """Momentum of the optimizers that take one (sgd, momentum, ...)."""
    layer_decay: float = 0.0
    """Layer-wise LR decay for fine-tuning (e.g. 0.75: each layer group from the head down gets 0.75x the
    next one's LR; groups from the model's timm group_matcher); 0 disables."""
    weight_decay: float = 0.05
    """AdamW decoupled weight decay."""
    warmup_fraction: float = 0.1
    """Fraction of all optimizer steps spent in linear warmup."""
    schedule: str = "cosine"
    """`cosine` (warmup then one cosine decay), `cosine_restarts` (SGDR warm restarts), or `constant`."""
    min_lr_ratio: float = 0.0
    """LR floor as a fraction of lr (eta_min / lr). Practice: a floor near 0.5 keeps late epochs from overfitting."""
    restart_epochs: int = 0
    """cosine_restarts: length of the first cycle in epochs (T_0); 0 means a quarter of the epochs."""
    restart_mult: int = 2
    """cosine_restarts: each cycle is this many times longer than the previous (T_mult)."""

    def __post_init__(self):
        _require(self.lr > 0, "optim.lr", self.lr, "> 0")
        _require(0 <= self.momentum < 1, "optim.momentum", self.momentum, "in [0, 1)")
        _require(0 <= self.layer_decay <= 1, "optim.layer_decay", self.layer_decay, "in (0, 1], or 0 to disable")
        _require(self.weight_decay >= 0, "optim.weight_decay", self.weight_decay, ">= 0")
        _require(0 <= self.warmup_fraction < 1, "optim.warmup_fraction", self.warmup_fraction, "in [0, 1)")
        _require(self.schedule in SCHEDULES, "optim.schedule", self.schedule, f"one of {SCHEDULES}")
        _require(0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio", self.min_lr_ratio, "in [0, 1]")
        _require(self.restart_epochs >= 0, "optim.restart_epochs", self.restart_epochs, ">= 0")
        _require(self.restart_mult >= 1, "optim.restart_mult", self.restart_mult, ">= 1")


@dataclass(kw_only=True)
class TrainConfig:
    epochs: int = 12
    """Training epochs per job."""
    batch_size: int = 64
    """Samples per process per micro-batch."""
    batch_size_schedule: dict[int, int] = field(default_factory=dict)
    """Training epoch -> batch size from that epoch on, e.g. {0: 128, 4: 64} beside an image_size_schedule;
    epochs increasing from 0. Empty: train.batch_size throughout (also the size of evaluation batches / 2)."""
    grad_accum_steps: int = 1
    """Micro-batches accumulated per optimizer step."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this; 0 disables clipping (the norm is still logged)."""
    precision: str = "no"
    """Mixed precision: `no` (fp32), `fp16` (with dynamic loss scaling) or `bf16`."""
    metric: str = "accuracy"
    """Validation metric that picks the best epoch and the best single model and drives early stopping, in its
    own direction: accuracy (multilabel: every label right), balanced_accuracy, f1 (binary: the positive class),
    f1_macro, f1_micro, qwk (quadratic weighted kappa), roc_auc, average_precision (binary), map (multilabel:
    mean average precision over the labels), log_loss (lower is better)."""
    loss: str = "ce"
    """`ce` (cross-entropy with label_smoothing), `focal` (focal loss: focal_gamma, focal_alpha; gamma 0 is ce;
    multilabel: sigmoid focal loss per label) or, for a binary or multilabel task, `bce` (binary cross-entropy
    on p(positive), or per label, with pos_weight). Under Mixup / CutMix the losses take the mixed soft
    targets. A multilabel task takes bce or focal."""
    label_smoothing: float = 0.0
    """Label smoothing of the targets (ce, focal, bce)."""
    focal_gamma: float = 2.0
    """Focal loss: down-weights well-classified samples by (1 - p_true)^gamma."""
    focal_alpha: float = 0.0
    """Focal loss, binary or multilabel task: weight of the positives (the negatives get 1 - alpha), e.g. 0.25
    as in RetinaNet; 0: no class weighting."""
    pos_weight: float = 1.0
    """bce: weight of the positive samples' loss (e.g. negatives / positives for a rare positive class)."""
    ema_decay: float = 0.0
    """Keep an exponential moving average of the weights (timm's ModelEmaV3, fp32), e.g. 0.999; every epoch
    it is evaluated beside the raw weights and the better of the two competes for the job's best epoch (the
    checkpoint and OOF source; done.json and report.json say which). 0 disables. Not with ZeRO-3."""
    ema_warmup: bool = False
    """Ramp the EMA decay up as 1 - (1 + step)^-0.75, capped at ema_decay (timm's warmup), so the random
    initial weights fade within the first hundreds of steps instead of thousands."""
    patience: int = 0
    """Stop a job after this many epochs without a better val metric; 0 disables."""
    max_train_val_gap: float = 0.0
    """Stop a job when train metric - val metric exceeds this (practice: 0.05); 0 disables. The train side is the
    metric on a fixed, un-augmented sample of the training fold as large as the validation fold."""
    progress: bool = True
    """Progress bars for epochs and steps (primary rank only)."""
    cpu_threads: int = 0
    """Intra-op threads per process on CPU; 0 = the CPUs this process may use (its affinity mask, capped by
    its cgroup's quota, e.g. a Kubernetes CPU limit) divided by this node's processes (accelerate launch would
    otherwise leave each process one thread)."""
    deterministic: bool = False
    """torch.use_deterministic_algorithms: bit-reproducible runs and resumes, at some speed cost on GPUs."""
    max_nonfinite_losses: int = 5
    """Stop the job with an error after this many consecutive micro-batches with a NaN/inf loss (fp16
    overflow steps that the loss scaler skips are counted separately and do not stop the job); 0 disables."""
    compile: bool = False
    """torch.compile the model (after gradient checkpointing, before DDP / DeepSpeed wrapping)."""
    compile_backend: str = "inductor"
    """torch.compile backend: `inductor` (generates kernels; the first step compiles for a minute or more),
    `aot_eager` (traces forward and backward without code generation), or another registered backend."""
    deepspeed: str = ""
    """DeepSpeed JSON (e.g. launch/deepspeed/zero2.json) to train with ZeRO instead of DDP; its "auto"
    values are filled from this section, explicit ones must agree with it. Under `accelerate launch` with a
    DeepSpeed YAML the JSON named there is used."""

    def __post_init__(self):
        _require(self.epochs >= 1, "train.epochs", self.epochs, ">= 1")
        _require(self.batch_size >= 1, "train.batch_size", self.batch_size, ">= 1")
        _require(self.grad_accum_steps >= 1, "train.grad_accum_steps", self.grad_accum_steps, ">= 1")
        _require(self.max_grad_norm >= 0, "train.max_grad_norm", self.max_grad_norm, ">= 0")
        _require(self.precision in PRECISIONS, "train.precision", self.precision, f"one of {PRECISIONS}")
        _require(self.metric in METRICS, "train.metric", self.metric, f"one of {tuple(METRICS)}")
        _require(0 <= self.label_smoothing < 1, "train.label_smoothing", self.label_smoothing, "in [0, 1)")
        _require(self.loss in LOSSES, "train.loss", self.loss, f"one of {tuple(LOSSES)}")
        _require(self.focal_gamma >= 0, "train.focal_gamma", self.focal_gamma, ">= 0")
        _require(0 <= self.focal_alpha < 1, "train.focal_alpha", self.focal_alpha, "in (0, 1), or 0 for none")
        _require(self.pos_weight > 0, "train.pos_weight", self.pos_weight, "> 0")
        _require(self.patience >= 0, "train.patience", self.patience, ">= 0")
        _require(0 <= self.ema_decay < 1, "train.ema_decay", self.ema_decay, "in (0, 1), or 0 to disable")
        _require(self.max_train_val_gap >= 0, "train.max_train_val_gap", self.max_train_val_gap, ">= 0")
        _require(self.cpu_threads >= 0, "train.cpu_threads", self.cpu_threads, ">= 0")
        _require(bool(self.compile_backend), "train.compile_backend", self.compile_backend, "a backend name")
        _require(self.max_nonfinite_losses >= 0, "train.max_nonfinite_losses", self.max_nonfinite_losses, ">= 0")


@dataclass(kw_only=True)
class MembersConfig:
    """Columns chosen by hand: each entry a column `<model>-s<seed>` or a backbone name (all its seeds)."""

    pin: list[str] = field(default_factory=list)
    """Columns that ensemble selection starts from (each counted once before its greedy rounds), so they are
    always members of the selection ensemble."""
    exclude: list[str] = field(default_factory=list)
    """Columns left out of every ensemble (and of the registered model), e.g. a backbone that overfits."""


@dataclass(kw_only=True)
class EnsembleConfig:
    stacking: bool = True
    """Fit a LightGBM meta-learner on the OOF probabilities (cross-validated on the base fold ids)."""
    vote_fraction: float = 0.6
    """'At least k of n' voting: k = ceil(vote_fraction * n) members must agree (0.6 of 5 = 3 of 5)."""
    vote_threshold: float = 0.5
    """A member votes for a class when its probability reaches this threshold."""
    learning_rate: float = 0.1
    """Meta-learner learning rate."""
    num_leaves: int = 15
    """Meta-learner tree size."""
    max_rounds: int = 100
    """Meta-learner boosting rounds at most (early stopping picks fewer)."""
    early_stopping: int = 10
    """Rounds without improvement on the early-stopping fold before the meta-learner stops."""
    max_meta_rows: int = 15000
    """Rows each fold's meta-model fits on at most (a fixed random subset); bounds stacking time."""
    selection_rounds: int = 25
    """Greedy ensemble selection (Caruana et al.): rounds of forward selection with replacement over the
    (model, seed) columns, cross-validated on the fold ids; 0 disables."""
    register_model: bool = True
    """Log the final ensemble as an MLflow pyfunc model and register it in the model registry."""
    model_name: str = ""
    """Registered model name; empty means distrain-<experiment>."""
    register: str = "best"
    """Which ensemble the registered model is: `best` (the best CV score among best_single, soft_vote,
    weighted_vote, selection and stacking; report.json's ensemble_model.ensemble names it) or one of those."""
    members: MembersConfig = field(default_factory=MembersConfig)
    """Columns pinned into the selection or excluded from every ensemble (`ensemble.members.pin` / `.exclude`)."""

    def __post_init__(self):
        _require(0 < self.vote_fraction <= 1, "ensemble.vote_fraction", self.vote_fraction, "in (0, 1]")
        _require(0 < self.vote_threshold < 1, "ensemble.vote_threshold", self.vote_threshold, "in (0, 1)")
        _require(self.learning_rate > 0, "ensemble.learning_rate", self.learning_rate, "> 0")
        _require(self.num_leaves >= 2, "ensemble.num_leaves", self.num_leaves, ">= 2")
        _require(self.max_rounds >= 1, "ensemble.max_rounds", self.max_rounds, ">= 1")
        _require(self.early_stopping >= 1, "ensemble.early_stopping", self.early_stopping, ">= 1")
        _require(self.max_meta_rows >= 100, "ensemble.max_meta_rows", self.max_meta_rows, ">= 100")
        _require(self.selection_rounds >= 0, "ensemble.selection_rounds", self.selection_rounds, ">= 0")
        registrable = ("best", "best_single", "soft_vote", "weighted_vote", "selection", "stacking")
        _require(self.register in registrable, "ensemble.register", self.register, f"one of {registrable}")
        if self.register == "stacking" or self.register == "selection":
            built = self.stacking if self.register == "stacking" else self.selection_rounds > 0
            _require(built, "ensemble.register", self.register, "an ensemble that is built (it is switched off)")


TRACKING_SCHEMES = ("http", "https", "sqlite", "postgresql", "mysql", "mssql", "databricks", "databricks-uc")


_URL_PASSWORD = re.compile(r"^[\w+.-]+://[^:/@]*:[^@]+@|[?&](password|passwd)=", re.IGNORECASE)  # as SQLAlchemy reads


def check_no_password(url: str, key: str) -> None:
    """Refuse a URL that carries a password (`user:pw@`, or a `password=` query): a config is copied into the run
    directory, into MLflow's artifacts and every job run's params, where anyone reading the study would see it."""
    if _URL_PASSWORD.search(url):
        raise ConfigError(f"{key}: the URL holds a password, which would be saved in config.yaml and MLflow; leave "
                          f"it out and give it through the environment (PostgreSQL: PGPASSWORD or ~/.pgpass; an "
                          f"MLflow server: MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD)")  # fmt: skip


def check_tracking_uri(uri: str, where: str) -> None:
    """Refuse, before any work, a tracking URI MLflow cannot store runs in (`where` names the key or variable)."""
    scheme = uri.partition("://")[0].split("+")[0].lower() if "://" in uri else ""
    if scheme in TRACKING_SCHEMES:
        return
    if scheme in ("", "file") and os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() in ("1", "true"):
        return
    if scheme in ("", "file"):
        raise ConfigError(f"{where}={uri!r}: MLflow 3 refuses its file store for new runs; use sqlite:///<path>/mlflow.db"
                          f" (or set MLFLOW_ALLOW_FILE_STORE=true)")  # fmt: skip
    raise ConfigError(f"{where}={uri!r}: MLflow has no store for scheme {scheme!r} (use one of "
                      f"{', '.join(TRACKING_SCHEMES)})")  # fmt: skip


@dataclass(kw_only=True)
class TrackingConfig:
    uri: str = ""
    """MLflow tracking URI. Empty: $MLFLOW_TRACKING_URI if set, else a SQLite store at <run_root>/mlflow.db."""
    experiment_name: str = ""
    """MLflow experiment; empty means the experiment's own name."""
    timeout_s: float = 10.0
    """Seconds one HTTP request to the tracking server may take (MLflow's default is 120)."""
    max_retries: int = 1
    """HTTP retries per call (MLflow's default, 7 with backoff 2, blocks for minutes on a dead server).
    After the first failed call distrain keeps training offline and buffers what it would have logged
    in <run_dir>/tracking-buffer/ until `distrain sync`."""
    system_metrics: bool = False
    """Log MLflow system metrics (CPU, memory, disk, network; GPU utilisation and memory when `pynvml` is
    installed) as `system/...` on each job's run while it trains; needs `psutil` (skipped without it)."""

    def __post_init__(self):
        if self.uri:
            check_tracking_uri(self.uri, "tracking.uri")
        _require(self.timeout_s > 0, "tracking.timeout_s", self.timeout_s, "> 0")
        _require(self.max_retries >= 0, "tracking.max_retries", self.max_retries, ">= 0")


@dataclass(kw_only=True)
class SweepConfig:
    """How `distrain sweep` runs its trials (the search space itself is a YAML file, `--space`)."""

    folds: list[int] = field(default_factory=lambda: [0])
    """The CV folds each trial trains (its value is their mean validation score)."""
    sampler: str = "tpe"
    """`tpe` (Optuna's Bayesian TPESampler, multivariate, with a constant liar for parallel workers) or `random`."""
    startup_trials: int = 4
    """Trials sampled at random before TPE models the results."""
    pruner: str = "median"
    """`median` (stop a trial whose validation metric is worse than the median of earlier trials at the same
    epoch) or `none`."""
    pruner_startup_trials: int = 2
    """Finished trials before the pruner stops any."""
    storage: str = ""
    """Optuna storage URL (e.g. postgresql://user@host/db for workers on several nodes, the password in
    PGPASSWORD or ~/.pgpass, never in the URL); empty: SQLite in the sweep's run directory
    (<run_root>/<experiment>-sweep/optuna.db)."""

    def __post_init__(self):
        _require(len(self.folds) >= 1 and len(set(self.folds)) == len(self.folds), "sweep.folds", self.folds,
                 "distinct fold ids")  # fmt: skip
        _require(self.sampler in ("tpe", "random"), "sweep.sampler", self.sampler, "tpe or random")
        _require(self.startup_trials >= 1, "sweep.startup_trials", self.startup_trials, ">= 1")
        _require(self.pruner in ("median", "none"), "sweep.pruner", self.pruner, "median or none")
        _require(self.pruner_startup_trials >= 1, "sweep.pruner_startup_trials", self.pruner_startup_trials, ">= 1")


@dataclass(kw_only=True)
class SchedulerConfig:
    lease_timeout_s: float = 120.0
    """A job whose owner has not heartbeaten for this long is claimable again (owner presumed dead)."""
    heartbeat_s: float = 10.0
    """How often a worker renews the lease of the job it trains."""
    max_retries: int = 2
    """Attempts of a job that may end in an error before it is marked failed."""
    max_lost_leases: int = 10
    """Attempts whose owner may vanish (SIGKILL, node loss) before the job is marked failed."""
    checkpoint_every_s: float = 300.0
    """Save a job's full training state at the first optimizer step after this many seconds (0: every step)."""
    keep_checkpoints: int = 2
    """Training-state checkpoints kept per job (older ones are deleted; a corrupt newest falls back)."""
    poll_s: float = 5.0
    """How often an idle worker looks again for claimable jobs while others run."""
    wait_for_others: bool = True
    """When no job is left to claim, wait while others run (to take over a job whose owner dies)."""

    def __post_init__(self):
        _require(self.lease_timeout_s > 0, "scheduler.lease_timeout_s", self.lease_timeout_s, "> 0")
        _require(
            0 < self.heartbeat_s < self.lease_timeout_s,
            "scheduler.heartbeat_s",
            self.heartbeat_s,
            f"in (0, lease_timeout_s={self.lease_timeout_s})",
        )
        _require(self.max_retries >= 1, "scheduler.max_retries", self.max_retries, ">= 1")
        _require(self.max_lost_leases >= 1, "scheduler.max_lost_leases", self.max_lost_leases, ">= 1")
        _require(self.checkpoint_every_s >= 0, "scheduler.checkpoint_every_s", self.checkpoint_every_s, ">= 0")
        _require(self.keep_checkpoints >= 1, "scheduler.keep_checkpoints", self.keep_checkpoints, ">= 1")
        _require(self.poll_s > 0, "scheduler.poll_s", self.poll_s, "> 0")


@dataclass(kw_only=True)
class Config:
    experiment: str = "digits"
    """Experiment name: the run directory is <run_root>/<experiment>."""
    task: str = "multiclass"
    """`multiclass` (one label per image, softmax), `binary` (data.num_classes 2, label 1 the positive class;
    the ensembles' decision threshold on p(positive) is tuned on the OOF predictions) or `multilabel` (any set
    of data.num_classes labels per image, one sigmoid each; a data set packed with `--multilabel`; one
    threshold per label tuned on the OOF predictions)."""
    run_root: str = "runs"
    """Where run directories (and the default MLflow store) live."""
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    tta: TTAConfig = field(default_factory=TTAConfig)
    cv: CVConfig = field(default_factory=CVConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ensemble: EnsembleConfig = field(default_factory=EnsembleConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    def __post_init__(self):
        _require(
            bool(self.experiment) and "/" not in self.experiment and not self.experiment.startswith("."),
            "experiment",
            self.experiment,
            "a non-empty name without '/'",
        )
        _require(self.task in TASKS, "task", self.task, f"one of {TASKS}")
        if self.task == "binary":
            _require(self.data.num_classes == 2, "data.num_classes", self.data.num_classes, "2 for task: binary")
        if self.data.source in DIGITS_TASKS:
            task, n = DIGITS_TASKS[self.data.source]
            _require(self.task == task, "task", self.task, f"{task} for data.source: {self.data.source}")
            _require(self.data.num_classes == n, "data.num_classes", self.data.num_classes,
                     f"{n} for data.source: {self.data.source}")  # fmt: skip
        _check_task_fit(self, "")
        for name, changes in self.model.overrides.items():
            _require(name in self.model.names, "model.overrides", name, f"a name in model.names {self.model.names}")
            for key in _override_keys(changes):
                _require(_overridable(key), f"model.overrides.{name}", key, "a key of optim, train (not metric), "
                         "augment, tta, data.image_size/interpolation/crop_pct/mean/std or model.drop_rate/"
                         "drop_path_rate/grad_checkpointing")  # fmt: skip
            _check_task_fit(self.for_model(name), f"model.overrides.{name}: ")  # builds it: bad values refused now
        _check_members(self)
        for fold in self.sweep.folds:
            _require(0 <= fold < self.cv.folds, "sweep.folds", self.sweep.folds,
                     f"fold ids below cv.folds={self.cv.folds}")  # fmt: skip
        _check_schedule("data.image_size_schedule", self.data.image_size_schedule, self.train.epochs, 8)
        _check_schedule("train.batch_size_schedule", self.train.batch_size_schedule, self.train.epochs, 1)
        sizes = list(self.data.image_size_schedule.values())
        if sizes:
            _require(sizes[-1] == self.data.image_size, "data.image_size_schedule", self.data.image_size_schedule,
                     f"a last size of data.image_size={self.data.image_size} (evaluation runs at it)")  # fmt: skip
        if self.augment.mixes:
            for b in (self.train.batch_size, *self.train.batch_size_schedule.values()):
                _require(b % 2 == 0, "train.batch_size", b,
                         "an even number with augment.mixup / augment.cutmix (timm's Mixup mixes pairs)")  # fmt: skip

    @property
    def run_dir(self) -> Path:
        return Path(self.run_root) / self.experiment

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def for_model(self, name: str) -> Config:
        """This config with `model.overrides[name]` applied (itself when there are none)."""
        changes = _override_keys(self.model.overrides.get(name, {}))
        if not changes:
            return self
        raw = self.to_dict()
        for key, value in changes.items():
            section, field_name = key.split(".", 1)
            raw[section][field_name] = value
        raw["model"]["overrides"] = {}  # applied; checked again without them
        try:
            cfg = _build(Config, raw, "")
        except ConfigError as e:
            raise ConfigError(f"model.overrides.{name}: {e}") from None
        cfg.model.overrides = self.model.overrides
        return cfg


def _check_members(cfg: Config) -> None:
    check_members(cfg.ensemble.members, [f"{m}-s{s}" for m in cfg.model.names for s in cfg.cv.seeds])


def check_members(members: MembersConfig, columns: list[str]) -> None:
    """Every `ensemble.members` entry names a backbone or one of `columns`; none is both pinned and
    excluded; something is left to ensemble. Raises ConfigError."""
    backbones = {c.rsplit("-s", 1)[0] for c in columns}
    for where, names in (("pin", members.pin), ("exclude", members.exclude)):
        for name in names:
            _require(name in columns or name in backbones, f"ensemble.members.{where}", name,
                     f"a backbone or a column <model>-s<seed> of {columns}")  # fmt: skip
    excluded = set(member_columns(members.exclude, columns))
    both = sorted(set(member_columns(members.pin, columns)) & excluded)
    _require(not both, "ensemble.members", both, "no column both pinned and excluded")
    left = set(columns) - excluded
    _require(bool(left), "ensemble.members.exclude", members.exclude, "to leave at least one column")


def members_from_dict(raw: dict, columns: list[str]) -> MembersConfig:
    """`ensemble.members` read from a mapping and checked against `columns` (of several run directories)."""
    members = _build(MembersConfig, raw, "ensemble.members.")
    check_members(members, columns)
    return members


def member_columns(names: list[str], columns: list[str]) -> list[str]:
    """The columns `ensemble.members` entries name: a column itself, or every column of a backbone."""
    return [c for c in columns if c in names or c.rsplit("-s", 1)[0] in names]


def _override_keys(changes: dict) -> dict[str, Any]:
    """{'optim': {'lr': 1}, 'data.image_size_schedule': {0: 16}} -> {'optim.lr': 1, 'data.image_size_schedule':
    {0: 16}}: flattened to `section.field` keys, a mapping-valued field kept whole."""
    out: dict[str, Any] = {}
    for key, value in changes.items():
        if "." not in str(key) and isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            out[str(key)] = value
    return out


def _check_schedule(key: str, schedule: dict[int, int], epochs: int, smallest: int) -> None:
    """Epoch keys strictly increasing from 0 and below train.epochs; values at least `smallest`."""
    starts = list(schedule)
    if not starts:
        return
    _require(starts[0] == 0, key, schedule, "a first epoch of 0")
    _require(all(a < b for a, b in zip(starts, starts[1:])), key, schedule, "strictly increasing epochs")
    _require(starts[-1] < epochs, key, schedule, f"epochs below train.epochs={epochs}")
    _require(all(v >= smallest for v in schedule.values()), key, schedule, f"values >= {smallest}")


def _check_task_fit(cfg: Config, where: str) -> None:
    """The metric and the loss fit the task; loss-specific settings are not set for another loss."""
    tc, task = cfg.train, cfg.task
    _require(metric_fits(tc.metric, task), f"{where}train.metric", tc.metric, f"a {task} metric: {metrics_for(task)}")
    _require(tc.loss in losses_for(task), f"{where}train.loss", tc.loss, f"a {task} loss: {losses_for(task)}")
    if tc.focal_alpha:
        _require(tc.loss == "focal" and task != "multiclass", f"{where}train.focal_alpha", tc.focal_alpha,
                 "0 unless train.loss is focal on a binary or multilabel task")  # fmt: skip
    if tc.pos_weight != 1.0:
        _require(tc.loss == "bce", f"{where}train.pos_weight", tc.pos_weight, "1 unless train.loss is bce")


_OVERRIDABLE = ("optim.", "train.", "augment.", "tta.", "data.image_size", "data.image_size_schedule",
                "data.interpolation", "data.crop_pct", "data.mean", "data.std", "model.drop_rate",
                "model.drop_path_rate", "model.grad_checkpointing")  # fmt: skip


def _overridable(key: str) -> bool:
    if key == "train.metric" or key.count(".") != 1:
        return False
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in _OVERRIDABLE)


# Keys that may change between runs of one run directory without changing what is trained.
VOLATILE_KEYS = (
    "tracking.",
    "data.num_workers",
    "train.progress",
    "train.cpu_threads",
    "ensemble.",
    "scheduler.",
    "sweep.",
)


def _require(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: invalid value {value!r} (expected {expected})")


def _check_type(key: str, value: Any, hint: Any) -> Any:
    """Return `value` coerced to `hint` where that is lossless (int -> float), else raise ConfigError."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _check_type(key, value, args[0])
    if origin is dict:
        key_type, item = typing.get_args(hint)
        if not isinstance(value, dict) or not all(type(k) is key_type for k in value):
            raise ConfigError(f"{key}: expected a mapping with {key_type.__name__} keys, got {value!r}")
        return {k: _check_type(f"{key}.{k}", v, item) for k, v in value.items()}
    if hint is typing.Any:
        return value
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list of {item.__name__}, got {value!r}")
        return [_check_type(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
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


def _build(cls: type, raw: Any, prefix: str) -> Any:
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
            kwargs[f.name] = _build(hint, raw[f.name] if raw[f.name] is not None else {}, f"{prefix}{f.name}.")
        else:
            kwargs[f.name] = _check_type(f"{prefix}{f.name}", raw[f.name], hint)
    return cls(**kwargs)


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
    cfg = _build(Config, raw, "")
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


def growth_differences(old: dict, new: dict) -> tuple[list[str], list[str]]:
    """(what grows, what is refused) between a run directory's config and a new one, as 'key: old -> new' lines.
    A study grows by new seeds (`cv.seeds`), new backbones (`model.names`) and the new backbones' own
    `model.overrides`, the old ones kept: the finished jobs did not depend on them. Any other difference
    (ignoring VOLATILE_KEYS) is refused, as is dropping a seed or backbone."""
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
        if any(key.startswith(f"model.overrides.{m}.") or key == f"model.overrides.{m}" for m in new_models):
            grows.append(line)
        else:
            refused.append(line)
    return grows, refused


def dump_yaml(cfg: Config) -> str:
    """The resolved config as YAML (saved in the run directory and logged to MLflow)."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
