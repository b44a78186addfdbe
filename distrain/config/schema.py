"""The experiment configuration as typed dataclasses, one per section, each field with its meaning in the
docstring under it (the configuration reference is generated from them). Checks that need only the values run
in `__post_init__` and raise one-line `ConfigError`s naming the key; choices are `Literal` types, checked when a
mapping is built (`distrain.config.typecheck`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from distrain.config.lookups import is_factory_name
from distrain.config.typecheck import build_dataclass, require
from distrain.config.urls import check_tracking_uri
from distrain.errors import ConfigError
from distrain.tasks import (
    COMPARISONS,
    DEFAULT_TASK,
    METRICS,
    TASKS,
    HeadSettings,
    LossSettings,
    get_task,
    known_losses,
    task_of_digits_source,
)

Precision = Literal["no", "fp16", "bf16"]
Schedule = Literal["cosine", "cosine_restarts", "constant"]
DataSource = Literal[
    "digits", "digits_binary", "digits_multilabel", "digits_pairs", "synth_text", "synth_shapes", "shards"
]
Interpolation = Literal["", "nearest", "bilinear", "bicubic", "lanczos"]
"""Empty: the model's own (timm's pretrained config)."""
EraseMode = Literal["pixel", "rand", "const"]
RegisterChoice = Literal["best", "best_single", "soft_vote", "weighted_vote", "selection", "stacking"]
"""`best`, or one of `distrain.names.REGISTRABLE` (a test keeps the two lists equal)."""
Sampler = Literal["tpe", "random"]
Pruner = Literal["median", "none"]


@dataclass(kw_only=True)
class DataConfig:
    source: DataSource = "digits"
    """`digits` (scikit-learn's bundled digits, written as shards on first use), `digits_binary` (the same
    images labelled 'is it an 8?': a binary task with 9.7% positives), `digits_multilabel` (each image labelled
    with its digit's properties: even, large (>= 5), loop, prime), `digits_pairs` (pairs of them, 'the same
    digit?', half of them so, for task pair_binary: blocks of 8 images give 10 pairs each and are one group, so no
    image is in two folds' pairs), `synth_text` (240 generated receipts with word polygons, for text detection,
    packed on first use), `synth_shapes` (240 generated images of shapes with their masks, 4 classes, for
    segmentation, packed on first use) or `shards` (packed with `distrain data pack`)."""
    root: str = "data/digits"
    """Directory holding the shards and their `index.json`."""
    unlabelled: str = ""
    """A directory of unlabelled images as `.tar` shards (`distrain data pack` writes them; any labels in them are
    ignored) that a pseudo-label round trains on with the labels the study's fold models gave them
    (`pseudo.labels`); not data.root, no sample id in common with it, the same channels and images per sample."""
    image_size: int = 32
    """Model input: image_size x image_size pixels (the shorter side resized to image_size / crop_pct,
    keeping the aspect ratio, then centre-cropped)."""
    image_size_schedule: dict[int, int] = field(default_factory=dict)
    """Progressive resolution: training epoch -> image size from that epoch on, e.g. {0: 640, 4: 960}; epochs
    increasing from 0, the last size data.image_size (validation, OOF and test always run at data.image_size).
    Empty: every epoch at data.image_size."""
    interpolation: Interpolation = ""
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
        require(self.image_size >= 8, "data.image_size", self.image_size, ">= 8")
        require(self.num_classes >= 1, "data.num_classes", self.num_classes, ">= 1")  # the task asks for more
        require(self.num_workers >= -1, "data.num_workers", self.num_workers, ">= 0, or -1 for one per CPU")
        require(self.shuffle_buffer >= 1, "data.shuffle_buffer", self.shuffle_buffer, ">= 1")
        require(self.cache_mb >= 0, "data.cache_mb", self.cache_mb, ">= 0")
        require(0.0 <= self.crop_pct <= 1.0, "data.crop_pct", self.crop_pct, "in (0, 1], or 0 for the model's")
        require(len(self.mean) in (0, 1, 3), "data.mean", self.mean, "1 or 3 values, or none for the model's")
        require(len(self.std) in (0, 1, 3), "data.std", self.std, "1 or 3 values, or none for the model's")
        require(all(v > 0 for v in self.std), "data.std", self.std, "values > 0")


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
    re_mode: EraseMode = "pixel"
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
            require(len(pair) == 2 and low < pair[0] <= pair[1], key, pair, f"[min, max] with {low} < min <= max")
        require(self.scale[1] <= 1.0, "augment.scale", self.scale, "max <= 1")
        for key in ("hflip", "vflip", "re_prob", "mix_prob", "switch_prob"):
            value = getattr(self, key)
            require(0.0 <= value <= 1.0, f"augment.{key}", value, "a probability in [0, 1]")
        for key in ("color_jitter", "mixup", "cutmix"):
            require(getattr(self, key) >= 0, f"augment.{key}", getattr(self, key), ">= 0")
        require(self.re_count >= 1, "augment.re_count", self.re_count, ">= 1")

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
            require(0.25 <= s <= 4 and s != 1.0, "tta.scales", self.scales, "factors in [0.25, 4] other than 1")


@dataclass(kw_only=True)
class DistillConfig:
    """Knowledge distillation from a finished study's ensemble: each CV sample's soft target is the ensemble's
    out-of-fold probability row (from the fold models that never trained on it). `distrain distill` writes this
    section into the student study it derives; set by hand, it distils from any file of that form."""

    teacher: str = ""
    """An .npz of soft targets (`distrain.study.soft_targets`): `sample_ids`, `probs` [n, C] (each CV sample's
    out-of-fold row: the whole-pool job's targets) and `fold_probs` [K, n, C] (fold m's teacher models' rows: fold
    m's targets); holdout samples refused. Empty: no distillation (the hard-label loss alone)."""
    temperature: float = 3.0
    """Softening of teacher and student probabilities in the soft-target loss (Hinton et al.; the loss is scaled by
    T^2 so its gradients keep their size)."""
    alpha: float = 0.7
    """Weight of the soft-target loss; 1 - alpha weights the hard-label loss (`train.loss`)."""

    def __post_init__(self):
        require(self.temperature > 0, "distill.temperature", self.temperature, "> 0")
        require(0.0 <= self.alpha <= 1.0, "distill.alpha", self.alpha, "a weight in [0, 1]")


@dataclass(kw_only=True)
class PseudoConfig:
    """A pseudo-label round: the unlabelled images of data.unlabelled join each fold's training samples with the
    class the study's fold models gave them, where they were sure enough. `distrain pseudo-label` writes this section
    into the round's study."""

    labels: str = ""
    """An .npz of the fold models' rows of the unlabelled samples (`sample_ids`, `fold_probs` [K, n, C],
    `fold_votes` [K, n]), as `distrain pseudo-label` writes it; fold m's jobs take fold m's rows (fold m's models
    never saw fold m). Empty: no pseudo-labels."""
    threshold: float = 0.9
    """A sample joins fold m's training samples when fold m's ensemble gives its class at least this probability..."""
    min_votes: int = 0
    """...and at least this many of the ensemble's columns (fold m's model of each) decide that class."""
    soft: bool = False
    """The pseudo-labelled images learn fold m's ensemble's probability rows (soft targets, the hard-label loss on
    them) instead of its class; not with augment.mixup / cutmix."""

    def __post_init__(self):
        require(0.0 <= self.threshold <= 1.0, "pseudo.threshold", self.threshold, "a probability in [0, 1]")
        require(self.min_votes >= 0, "pseudo.min_votes", self.min_votes, ">= 0")


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
        require(self.folds >= 2, "cv.folds", self.folds, ">= 2")
        require(len(self.seeds) >= 1, "cv.seeds", self.seeds, "at least one seed")
        require(len(set(self.seeds)) == len(self.seeds), "cv.seeds", self.seeds, "distinct seeds")
        for f in self.only_folds:
            require(0 <= f < self.folds, "cv.only_folds", self.only_folds, f"fold ids in [0, {self.folds})")


@dataclass(kw_only=True)
class ModelConfig:
    names: list[str] = field(default_factory=lambda: ["resnet10t"])
    """timm model names, or import paths `package.module:function` of your own model factories (called as
    `function(num_classes=..., in_chans=..., **kwargs)`, returning a torch.nn.Module; the module must be importable
    where jobs run and where the registered model is served); each is a backbone of the ensemble."""
    pretrained: bool = False
    """Start from timm's pretrained weights (downloaded from the Hugging Face hub into its cache once;
    with HF_HUB_OFFLINE=1 only the cache is used). The classifier is re-made for data.num_classes and the
    first convolution adapted to the data's channels, as timm does. timm names only (a factory: pretrained_file)."""
    pretrained_file: str = ""
    """A local checkpoint (.safetensors, .pth, .bin) to start from instead of the hub (timm's
    pretrained_cfg_overlay file=...); implies pretrained. One model name only. For a factory, a state dict loaded
    strictly, except for a classifier of another shape (left as the factory made it)."""
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
    factory_args: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Keyword arguments of your own model factories: factory path in model.names -> {argument: value}, passed
    after num_classes, in_chans and drop_rate / drop_path_rate (when non-zero); e.g.
    `examples.smallnet:build: {width: 32}`. Recorded in the registered model, which rebuilds each network with them."""
    comparison: list[str] = field(default_factory=lambda: ["abs_diff", "product"])
    """Pair tasks: how the siamese head compares the two images' embeddings a and b, any of abs_diff (|a-b|),
    concat ([a, b]), product (a*b), cosine (cos(a, b)), l2 (||a-b||) and residual (a residual block on the fused
    features); empty: the network (your factory's) takes the pair itself, stacked on channels."""
    neck_channels: int = 256
    """Dense tasks: channels of the FPN neck and of the head's branches (256 as MMOCR's DBNet; 64 makes a tiny
    backbone's network 4x faster on a CPU)."""

    def head_settings(self) -> HeadSettings:
        """What the task puts on the network (`Task.build_model`)."""
        return HeadSettings(tuple(self.comparison), self.neck_channels)

    def __post_init__(self):
        require(len(self.names) >= 1, "model.names", self.names, "at least one model")
        for c in self.comparison:
            require(c in COMPARISONS, "model.comparison", self.comparison, f"values from {list(COMPARISONS)}")
        if self.comparison:
            require(self.comparison != ["residual"], "model.comparison", self.comparison, "at least one feature")
        factories = [n for n in self.names if is_factory_name(n)]
        for name in self.factory_args:
            require(name in factories, "model.factory_args", name, f"a factory path in model.names {factories}")
        if self.pretrained and factories and not self.pretrained_file:
            raise ConfigError(f"model.pretrained: {factories[0]!r} is your own factory: there are no hub weights "
                              "for it; set model.pretrained_file to a state dict instead")  # fmt: skip
        require(0.0 <= self.drop_rate < 1.0, "model.drop_rate", self.drop_rate, "in [0, 1)")
        require(0.0 <= self.drop_path_rate < 1.0, "model.drop_path_rate", self.drop_path_rate, "in [0, 1)")
        if self.pretrained_file:
            require(len(self.names) == 1, "model.pretrained_file", self.pretrained_file,
                     "a file for a single model name (model.names has several)")  # fmt: skip


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
    schedule: Schedule = "cosine"
    """`cosine` (warmup then one cosine decay), `cosine_restarts` (SGDR warm restarts), or `constant`."""
    min_lr_ratio: float = 0.0
    """LR floor as a fraction of lr (eta_min / lr). Practice: a floor near 0.5 keeps late epochs from overfitting."""
    restart_epochs: int = 0
    """cosine_restarts: length of the first cycle in epochs (T_0); 0 means a quarter of the epochs."""
    restart_mult: int = 2
    """cosine_restarts: each cycle is this many times longer than the previous (T_mult)."""

    def __post_init__(self):
        require(self.lr > 0, "optim.lr", self.lr, "> 0")
        require(0 <= self.momentum < 1, "optim.momentum", self.momentum, "in [0, 1)")
        require(0 <= self.layer_decay <= 1, "optim.layer_decay", self.layer_decay, "in (0, 1], or 0 to disable")
        require(self.weight_decay >= 0, "optim.weight_decay", self.weight_decay, ">= 0")
        require(0 <= self.warmup_fraction < 1, "optim.warmup_fraction", self.warmup_fraction, "in [0, 1)")
        require(0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio", self.min_lr_ratio, "in [0, 1]")
        require(self.restart_epochs >= 0, "optim.restart_epochs", self.restart_epochs, ">= 0")
        require(self.restart_mult >= 1, "optim.restart_mult", self.restart_mult, ">= 1")


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
    precision: Precision = "no"
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
    channels_last: bool = True
    """On CUDA: the model and its inputs in channels-last memory format (the layout tensor cores convolve in;
    timm trains CNNs this way). No effect on CPU."""
    tf32: bool = True
    """On CUDA: TF32 for fp32 matmuls and convolutions (`torch.set_float32_matmul_precision("high")`); off under
    train.deterministic."""
    cudnn_benchmark: bool = True
    """On CUDA: cuDNN times the convolution algorithms for each new input shape and keeps the fastest; off under
    train.deterministic."""
    fused_optimizer: bool = True
    """On CUDA with DDP: torch's fused AdamW / Adam (one kernel for every parameter's update instead of a loop)."""
    sync_every_steps: int = 8
    """Optimizer steps between the ranks' agreement on stopping and checkpointing (a tiny all-reduce on the CPU
    control group): a SIGTERM or a due checkpoint waits at most this many steps; 1 agrees at every step."""
    collective_timeout_s: float = 600.0
    """Seconds a training collective (gradient all-reduce, gathers) waits for the other ranks before the process
    group fails: how soon a lost or hung rank is noticed (then the job's attempt fails and is retried)."""
    control_timeout_s: float = 10800.0
    """Seconds the other ranks wait while rank 0 alone works (ledger, checkpoint writes, the aggregation with its
    MLflow uploads): they wait on a gloo group of their own, so a long aggregation never trips the training
    collectives' timeout above."""
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
        require(self.epochs >= 1, "train.epochs", self.epochs, ">= 1")
        require(self.batch_size >= 1, "train.batch_size", self.batch_size, ">= 1")
        require(self.grad_accum_steps >= 1, "train.grad_accum_steps", self.grad_accum_steps, ">= 1")
        require(self.max_grad_norm >= 0, "train.max_grad_norm", self.max_grad_norm, ">= 0")
        require(self.metric in METRICS, "train.metric", self.metric, f"one of {tuple(METRICS)}")
        require(0 <= self.label_smoothing < 1, "train.label_smoothing", self.label_smoothing, "in [0, 1)")
        require(self.loss in known_losses(), "train.loss", self.loss, f"one of {known_losses()}")
        require(self.focal_gamma >= 0, "train.focal_gamma", self.focal_gamma, ">= 0")
        require(0 <= self.focal_alpha < 1, "train.focal_alpha", self.focal_alpha, "in (0, 1), or 0 for none")
        require(self.pos_weight > 0, "train.pos_weight", self.pos_weight, "> 0")
        require(self.patience >= 0, "train.patience", self.patience, ">= 0")
        require(0 <= self.ema_decay < 1, "train.ema_decay", self.ema_decay, "in (0, 1), or 0 to disable")
        require(self.max_train_val_gap >= 0, "train.max_train_val_gap", self.max_train_val_gap, ">= 0")
        require(self.cpu_threads >= 0, "train.cpu_threads", self.cpu_threads, ">= 0")
        require(bool(self.compile_backend), "train.compile_backend", self.compile_backend, "a backend name")
        require(self.max_nonfinite_losses >= 0, "train.max_nonfinite_losses", self.max_nonfinite_losses, ">= 0")
        require(self.sync_every_steps >= 1, "train.sync_every_steps", self.sync_every_steps, ">= 1")
        require(self.collective_timeout_s > 0, "train.collective_timeout_s", self.collective_timeout_s, "> 0")
        require(self.control_timeout_s > 0, "train.control_timeout_s", self.control_timeout_s, "> 0")

    def loss_settings(self) -> LossSettings:
        """What a task builds its loss from."""
        return LossSettings(self.loss, self.label_smoothing, self.focal_gamma, self.focal_alpha, self.pos_weight)


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
    box_iou: float = 0.5
    """Text detection's box voting: boxes of different models are one box at this IoU or more."""
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
    register: RegisterChoice = "best"
    """Which ensemble the registered model is: `best` (the best CV score among best_single, soft_vote,
    weighted_vote, selection and stacking; report.json's ensemble_model.ensemble names it) or one of those."""
    members: MembersConfig = field(default_factory=MembersConfig)
    """Columns pinned into the selection or excluded from every ensemble (`ensemble.members.pin` / `.exclude`)."""

    def __post_init__(self):
        require(0 < self.vote_fraction <= 1, "ensemble.vote_fraction", self.vote_fraction, "in (0, 1]")
        require(0 < self.vote_threshold < 1, "ensemble.vote_threshold", self.vote_threshold, "in (0, 1)")
        require(self.learning_rate > 0, "ensemble.learning_rate", self.learning_rate, "> 0")
        require(self.num_leaves >= 2, "ensemble.num_leaves", self.num_leaves, ">= 2")
        require(self.max_rounds >= 1, "ensemble.max_rounds", self.max_rounds, ">= 1")
        require(self.early_stopping >= 1, "ensemble.early_stopping", self.early_stopping, ">= 1")
        require(self.max_meta_rows >= 100, "ensemble.max_meta_rows", self.max_meta_rows, ">= 100")
        require(self.selection_rounds >= 0, "ensemble.selection_rounds", self.selection_rounds, ">= 0")
        if self.register == "stacking" or self.register == "selection":
            built = self.stacking if self.register == "stacking" else self.selection_rounds > 0
            require(built, "ensemble.register", self.register, "an ensemble that is built (it is switched off)")


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
        require(self.timeout_s > 0, "tracking.timeout_s", self.timeout_s, "> 0")
        require(self.max_retries >= 0, "tracking.max_retries", self.max_retries, ">= 0")


@dataclass(kw_only=True)
class SweepConfig:
    """How `distrain sweep` runs its trials (the search space itself is a YAML file, `--space`)."""

    folds: list[int] = field(default_factory=lambda: [0])
    """The CV folds each trial trains (its value is their mean validation score)."""
    sampler: Sampler = "tpe"
    """`tpe` (Optuna's Bayesian TPESampler, multivariate, with a constant liar for parallel workers) or `random`."""
    startup_trials: int = 4
    """Trials sampled at random before TPE models the results."""
    pruner: Pruner = "median"
    """`median` (stop a trial whose validation metric is worse than the median of earlier trials at the same
    epoch) or `none`."""
    pruner_startup_trials: int = 2
    """Finished trials before the pruner stops any."""
    storage: str = ""
    """Optuna storage URL (e.g. postgresql://user@host/db for workers on several nodes, the password in
    PGPASSWORD or ~/.pgpass, never in the URL); empty: SQLite in the sweep's run directory
    (<run_root>/<experiment>-sweep/optuna.db)."""

    def __post_init__(self):
        require(len(self.folds) >= 1 and len(set(self.folds)) == len(self.folds), "sweep.folds", self.folds,
                 "distinct fold ids")  # fmt: skip
        require(self.startup_trials >= 1, "sweep.startup_trials", self.startup_trials, ">= 1")
        require(self.pruner_startup_trials >= 1, "sweep.pruner_startup_trials", self.pruner_startup_trials, ">= 1")


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
        require(self.lease_timeout_s > 0, "scheduler.lease_timeout_s", self.lease_timeout_s, "> 0")
        require(
            0 < self.heartbeat_s < self.lease_timeout_s,
            "scheduler.heartbeat_s",
            self.heartbeat_s,
            f"in (0, lease_timeout_s={self.lease_timeout_s})",
        )
        require(self.max_retries >= 1, "scheduler.max_retries", self.max_retries, ">= 1")
        require(self.max_lost_leases >= 1, "scheduler.max_lost_leases", self.max_lost_leases, ">= 1")
        require(self.checkpoint_every_s >= 0, "scheduler.checkpoint_every_s", self.checkpoint_every_s, ">= 0")
        require(self.keep_checkpoints >= 1, "scheduler.keep_checkpoints", self.keep_checkpoints, ">= 1")
        require(self.poll_s > 0, "scheduler.poll_s", self.poll_s, "> 0")


@dataclass(kw_only=True)
class Config:
    experiment: str = "digits"
    """Experiment name: the run directory is <run_root>/<experiment>."""
    task: str = DEFAULT_TASK
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
    distill: DistillConfig = field(default_factory=DistillConfig)
    pseudo: PseudoConfig = field(default_factory=PseudoConfig)

    def __post_init__(self):
        require(
            bool(self.experiment) and "/" not in self.experiment and not self.experiment.startswith("."),
            "experiment",
            self.experiment,
            "a non-empty name without '/'",
        )
        require(self.task in TASKS, "task", self.task, f"one of {tuple(TASKS)}")
        for problem in get_task(self.task).config_problems(self.data.num_classes):
            raise ConfigError(problem)
        _check_digits_source(self.task, self.data)
        _check_task_fit(self, "")
        for name, changes in self.model.overrides.items():
            require(name in self.model.names, "model.overrides", name, f"a name in model.names {self.model.names}")
            for key in _override_keys(changes):
                require(_overridable(key), f"model.overrides.{name}", key, "a key of optim, train (not metric), "
                         "augment, tta, data.image_size/interpolation/crop_pct/mean/std or model.drop_rate/"
                         "drop_path_rate/grad_checkpointing/comparison")  # fmt: skip
            _check_task_fit(self.for_model(name), f"model.overrides.{name}: ")  # builds it: bad values refused now
        _check_members(self)
        for fold in self.sweep.folds:
            require(0 <= fold < self.cv.folds, "sweep.folds", self.sweep.folds,
                     f"fold ids below cv.folds={self.cv.folds}")  # fmt: skip
        _check_schedule("data.image_size_schedule", self.data.image_size_schedule, self.train.epochs, 8)
        _check_schedule("train.batch_size_schedule", self.train.batch_size_schedule, self.train.epochs, 1)
        sizes = list(self.data.image_size_schedule.values())
        if sizes:
            require(sizes[-1] == self.data.image_size, "data.image_size_schedule", self.data.image_size_schedule,
                     f"a last size of data.image_size={self.data.image_size} (evaluation runs at it)")  # fmt: skip
        if self.augment.mixes:
            for b in (self.train.batch_size, *self.train.batch_size_schedule.values()):
                require(b % 2 == 0, "train.batch_size", b,
                         "an even number with augment.mixup / augment.cutmix (timm's Mixup mixes pairs)")  # fmt: skip
        _check_distill(self)
        _check_pseudo(self)

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
            cfg = build_dataclass(Config, raw, "")
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
            require(name in columns or name in backbones, f"ensemble.members.{where}", name,
                     f"a backbone or a column <model>-s<seed> of {columns}")  # fmt: skip
    excluded = set(member_columns(members.exclude, columns))
    both = sorted(set(member_columns(members.pin, columns)) & excluded)
    require(not both, "ensemble.members", both, "no column both pinned and excluded")
    left = set(columns) - excluded
    require(bool(left), "ensemble.members.exclude", members.exclude, "to leave at least one column")


def members_from_dict(raw: dict, columns: list[str]) -> MembersConfig:
    """`ensemble.members` read from a mapping and checked against `columns` (of several run directories)."""
    members = build_dataclass(MembersConfig, raw, "ensemble.members.")
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
    require(starts[0] == 0, key, schedule, "a first epoch of 0")
    require(all(a < b for a, b in zip(starts, starts[1:])), key, schedule, "strictly increasing epochs")
    require(starts[-1] < epochs, key, schedule, f"epochs below train.epochs={epochs}")
    require(all(v >= smallest for v in schedule.values()), key, schedule, f"values >= {smallest}")


def _check_distill(cfg: Config) -> None:
    """Soft targets are rows of class probabilities of whole samples: not a dense task's maps; and Mixup / CutMix
    would mix the images but not their soft targets."""
    if not cfg.distill.teacher:
        return
    require(not get_task(cfg.task).dense, "distill.teacher", cfg.distill.teacher,
            f"empty: task {cfg.task} predicts maps, not the probability rows soft targets are")  # fmt: skip
    require(not cfg.augment.mixes, "distill.teacher", cfg.distill.teacher,
            "empty with augment.mixup / augment.cutmix (they mix images, not soft targets)")  # fmt: skip
    require(not cfg.pseudo.labels, "distill.teacher", cfg.distill.teacher,
            "empty in a pseudo-label round (pseudo.labels): its unlabelled images have no soft targets")  # fmt: skip


def _check_pseudo(cfg: Config) -> None:
    """Pseudo-labels are classes of one-of-C tasks, read from data.unlabelled."""
    if not cfg.pseudo.labels:
        return
    require(bool(cfg.data.unlabelled), "pseudo.labels", cfg.pseudo.labels, "empty without data.unlabelled")
    task = get_task(cfg.task)
    require(task.argmax_decisions and not task.dense, "pseudo.labels", cfg.pseudo.labels,
            f"empty: task {cfg.task} does not decide one class per sample")  # fmt: skip
    require(not (cfg.pseudo.soft and cfg.augment.mixes), "pseudo.soft", cfg.pseudo.soft,
            "false with augment.mixup / augment.cutmix (they mix images, not soft targets)")  # fmt: skip


def _check_digits_source(task_name: str, data: DataConfig) -> None:
    """A bundled digits source is labelled for one task, with its number of classes."""
    generated = {"synth_text": "json", "synth_shapes": "mask.png"}  # the annotations each generated source has
    if data.source in generated:
        require(get_task(task_name).annotation == generated[data.source], "data.source", data.source,
                 f"a source whose samples task: {task_name} takes")  # fmt: skip
    task = task_of_digits_source(data.source)
    if task is None:
        return
    require(task_name == task.name, "task", task_name, f"{task.name} for data.source: {data.source}")
    n = len(task.digits_labels(np.arange(10))[1])
    require(data.num_classes == n, "data.num_classes", data.num_classes, f"{n} for data.source: {data.source}")


def _check_task_fit(cfg: Config, where: str) -> None:
    """The metric and the loss fit the task; loss-specific settings are not set for another loss."""
    tc, task = cfg.train, get_task(cfg.task)
    metrics, losses = list(task.metrics), list(task.losses)
    require(tc.metric in metrics, f"{where}train.metric", tc.metric, f"a {task.name} metric: {metrics}")
    require(tc.loss in losses, f"{where}train.loss", tc.loss, f"a {task.name} loss: {losses}")
    if tc.focal_alpha:
        with_positives = [t.name for t in TASKS.values() if t.weights_positives]
        require(tc.loss == "focal" and task.weights_positives, f"{where}train.focal_alpha", tc.focal_alpha,
                 f"0 unless train.loss is focal on a {' or '.join(with_positives)} task")  # fmt: skip
    if tc.pos_weight != 1.0:
        require(tc.loss == "bce", f"{where}train.pos_weight", tc.pos_weight, "1 unless train.loss is bce")
    if task.dense:
        _check_dense_fit(cfg, where)


def _check_dense_fit(cfg: Config, where: str) -> None:
    """A dense task's samples are images with per-pixel targets: nothing that mixes or erases images, no
    flipped views, and sides the network's stride-32 features divide."""
    name, ac = cfg.task, cfg.augment
    for key, value in (("augment.mixup", ac.mixup), ("augment.cutmix", ac.cutmix), ("augment.re_prob", ac.re_prob)):
        require(not value, f"{where}{key}", value, f"0 for task: {name} (its targets are per pixel)")
    require(not (cfg.tta.hflip or cfg.tta.vflip or cfg.tta.scales), f"{where}tta", dataclasses.asdict(cfg.tta),
             f"off for task: {name}")  # fmt: skip
    for size in (cfg.data.image_size, *cfg.data.image_size_schedule.values()):
        require(size % 32 == 0, f"{where}data.image_size", size, f"a multiple of 32 for task: {name}")
    require(cfg.train.label_smoothing == 0, f"{where}train.label_smoothing", cfg.train.label_smoothing,
             f"0 for task: {name}")  # fmt: skip


_OVERRIDABLE = ("optim.", "train.", "augment.", "tta.", "data.image_size", "data.image_size_schedule",
                "data.interpolation", "data.crop_pct", "data.mean", "data.std", "model.drop_rate",
                "model.drop_path_rate", "model.grad_checkpointing", "model.comparison")  # fmt: skip


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
