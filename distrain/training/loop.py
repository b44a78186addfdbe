"""Fit one job (one model, one seed, one fold): train, evaluate every epoch, keep the best weights,
and return out-of-fold (OOF) probabilities for the fold's validation samples and probabilities for
the holdout test split, keyed by sample id.

The same code runs as one CPU process, as 2 processes of DDP over gloo on CPU, and on N GPUs over
one or several nodes; everything rank-aware goes through `distrain.distributed`.

    fit_job = build (JobTrainer) -> resume -> per epoch: train_epoch, evaluate, stop? -> finish
"""

from __future__ import annotations

import dataclasses
import functools
import random
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from distrain.config import Config, SchedulerConfig
from distrain.console import is_terminal
from distrain.data.augment import BatchAugment
from distrain.data.dense import dense_eval_decoder, dense_train_decoder
from distrain.data.index import DatasetIndex
from distrain.data.loaders import default_workers, eval_loader, fits_in_cache, train_decoder, train_loader
from distrain.data.transforms import TestTimeAugment, resolve_transform
from distrain.data.unlabelled import unlabelled_urls
from distrain.distributed import runtime
from distrain.distributed.wrap import wrap
from distrain.errors import ConfigError, Interrupted, NonFiniteLoss
from distrain.study.plan import Job
from distrain.study.results import JobResult, Predictions
from distrain.tasks import get_task, improves, overfit_gap
from distrain.tasks.losses import Distilled
from distrain.training.checkpoint import (
    list_states,
    load_latest_state,
    prune_engine_checkpoints,
    rng_state,
    save_state,
    set_rng_state,
)
from distrain.training.distill import SoftPseudoTargets, TeacherRows, job_pseudo_labels
from distrain.training.evaluate import check_coverage, predict
from distrain.training.models import create_ema, create_model, model_settings
from distrain.training.optim import create_optimizer, create_scheduler
from distrain.training.state import EpochSums, TrainState

if TYPE_CHECKING:
    from accelerate import Accelerator

    from distrain.tracking.base import Tracker

STATE_FORMAT = "distrain-state/1"


@dataclass
class JobControl:
    """How the caller steers a running job: where its full training state is checkpointed and how
    often, when it must stop (SIGTERM, a lost lease), and a dict it reads progress from (heartbeats)."""

    state_dir: Optional[Path] = None
    """Directory of this job's training-state checkpoints; None: no checkpoints, no resume."""
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    """How often the state is saved (`checkpoint_every_s`, at the first optimizer-step boundary after it) and how
    many saves are kept (`keep_checkpoints`)."""
    stop_requested: Callable[[], bool] = lambda: False
    """This rank's wish to stop; any rank's wish stops all ranks at the same step, after a save."""
    progress: dict = field(default_factory=dict)
    fence: Callable[[], None] = lambda: None
    """Raises (LeaseLost) when this worker no longer owns the job; called on rank 0 before each checkpoint
    write and prune."""
    after_epoch: Callable[[int, float], None] = lambda epoch, val_score: None
    """Called on every rank after each epoch's validation with the epoch and its (gathered) score; may raise to
    end the job there (a sweep's pruner does)."""
    first_step: int = 0
    """The MLflow step of epoch 0: a sweep trial trains several folds into one run, fold i from i x epochs, so
    each run's metric history has one row per step."""


def steps_per_epoch(n_train: int, world_size: int, batch_size: int, accum: int) -> int:
    """Micro-batches each rank takes per epoch: one pass over the fold's training samples in total,
    rounded down to whole optimizer steps. Raises ConfigError if not even one step fits."""
    steps = (n_train // (world_size * batch_size)) // accum * accum
    if steps == 0:
        raise ConfigError(
            f"train.batch_size={batch_size} x grad_accum_steps={accum} x {world_size} processes "
            f"exceeds the {n_train} training samples of a fold"
        )
    return steps


def check_batches_fit(cfg: Config, fold_of_sample: dict[str, int], world_size: int) -> None:
    """Refuse, before any job starts, a batch size (of any model, at any epoch) that not even the smallest
    training fold fills once: the same ConfigError every job would raise."""
    fold_sizes = Counter(fold_of_sample.values())
    smallest_train = len(fold_of_sample) - max(fold_sizes.values())
    for name in cfg.model.names:
        tc = cfg.for_model(name).train
        for batch_size in {tc.batch_size, *tc.batch_size_schedule.values()}:
            steps_per_epoch(smallest_train, world_size, batch_size, tc.grad_accum_steps)


def fit_job(
    job: Job,
    cfg: Config,
    index: DatasetIndex,
    fold_of_sample: dict[str, int],
    accelerator: Accelerator,
    tracker: Optional[Tracker] = None,
    run_id: str = "",
    control: Optional[JobControl] = None,
) -> JobResult:
    """Train `job` to completion (or early stop) and predict OOF and test from its best epoch.

    With `control.state_dir`, the full training state is checkpointed there and a later call resumes
    from the newest good checkpoint: same weights, optimizer, schedule, every rank's RNG and data
    position, so a resumed job ends bit-identical to an uninterrupted one (with deterministic kernels).
    Raises `Interrupted` when `control.stop_requested` turned true (its state saved first).
    """
    cfg = cfg.for_model(job.model)  # model.overrides for this backbone
    trainer = JobTrainer(job, cfg, index, fold_of_sample, accelerator, tracker, run_id, control or JobControl())
    trainer.resume()
    epochs = tqdm(
        range(trainer.state.epoch, cfg.train.epochs),
        desc=job.id,
        disable=not trainer.show_progress,
        leave=False,
        dynamic_ncols=True,
    )
    for epoch in epochs:
        row = trainer.evaluate(epoch, trainer.train_epoch(epoch))
        best = trainer.state.best
        val = row.get(f"val_{cfg.train.metric}", float("nan"))  # a whole-pool job validates on nothing
        epochs.set_postfix(val=f"{val:.4f}", best=f"{best.score:.4f}")
        if cfg.train.progress and not trainer.show_progress:  # a log: one plain line per epoch instead
            scored = "" if job.whole_pool else f"val_{cfg.train.metric} {val:.4f} (best {best.score:.4f}), "
            trainer.log(
                f"distrain: {job.id}: epoch {epoch + 1}/{cfg.train.epochs} {scored}train_loss "
                f"{row['train_loss']:.4f}, {row['samples_per_s']:.0f} samples/s"
            )
        trainer.control.after_epoch(epoch, val)
        if trainer.should_stop_early(epoch, row):
            break  # every rank sees the same gathered metric, so every rank stops together
        if epoch + 1 < cfg.train.epochs:
            trainer.step_boundary(epoch + 1, 0)
    return trainer.finish()


@dataclass(frozen=True)
class EpochPlan:
    """What one training epoch trains at: progressive resolution's image size and batch size, and the first
    epoch of the phase (the run of epochs with both unchanged) it belongs to."""

    image_size: int
    batch_size: int
    phase_start: int

    @classmethod
    def of(cls, cfg: Config, epoch: int) -> EpochPlan:
        def at(schedule: dict[int, int], e: int, default: int) -> int:
            return next((v for start, v in reversed(schedule.items()) if start <= e), default)

        def key(e: int) -> tuple[int, int]:
            return (at(cfg.data.image_size_schedule, e, cfg.data.image_size),
                    at(cfg.train.batch_size_schedule, e, cfg.train.batch_size))  # fmt: skip

        first = epoch
        while first > 0 and key(first - 1) == key(epoch):
            first -= 1
        return cls(*key(epoch), phase_start=first)


def train_probe_ids(train_ids: set[str], n: int, job: Job) -> list[str]:
    """The fixed sample of a job's training fold (n ids, seeded by the job) scored un-augmented every epoch."""
    return random.Random(job.seed * 100 + job.fold).sample(sorted(train_ids), min(len(train_ids), n))


def _never() -> bool:
    return False


class _NonFiniteCounter:
    """Consecutive non-finite losses, kept on the device and read every few steps (no per-step host sync)."""

    def __init__(self, device: torch.device, limit: int):
        self.limit = limit
        self.check_every = max(1, min(8, limit or 8))
        self.run = torch.zeros((), device=device)
        self.worst = torch.zeros((), device=device)
        self.total = torch.zeros((), device=device)

    def add(self, finite: torch.Tensor) -> None:
        self.run = (self.run + 1) * (~finite)
        self.worst = torch.maximum(self.worst, self.run)
        self.total += ~finite

    def check(self, job: Job, epoch: int, step: int) -> None:
        """Hard stop once `limit` consecutive micro-batch losses were NaN/inf (0: never)."""
        if self.limit and float(self.worst) >= self.limit:
            raise NonFiniteLoss(
                f"{job.id}: {int(self.worst)} consecutive non-finite losses by epoch {epoch} step "
                f"{step} (train.max_nonfinite_losses={self.limit}); lower optim.lr, raise "
                f"train.max_grad_norm clipping, or use bf16 instead of fp16"
            )

    def take_total(self) -> int:
        """Non-finite losses since the last call."""
        total = int(self.total)
        self.total.zero_()
        return total


class JobTrainer:
    """One job's model, optimizer, schedule, data stream and `TrainState`, with the loop's named steps."""

    def __init__(
        self,
        job: Job,
        cfg: Config,
        index: DatasetIndex,
        fold_of_sample: dict[str, int],
        accelerator: Accelerator,
        tracker: Optional[Tracker],
        run_id: str,
        control: JobControl,
    ):
        self.job, self.cfg, self.index, self.accelerator = job, cfg, index, accelerator
        self.tracker, self.run_id, self.control = tracker, run_id, control
        tc, dc = cfg.train, cfg.data
        self.world = accelerator.num_processes
        self.show_progress = accelerator.is_main_process and tc.progress and is_terminal()  # bars: terminal only
        self.task = get_task(cfg.task)
        cv_labels = index.labels_of("cv")
        self.val_ids = {s for s in cv_labels if fold_of_sample[s] == job.fold}
        train_ids = set(cv_labels) - self.val_ids
        runtime.seed_everything(job.seed)  # identical initial weights on every rank
        mc = cfg.model
        make = functools.partial(create_model, job.model, pretrained=mc.pretrained, pretrained_file=mc.pretrained_file,
                                 **model_settings(mc, job.model))  # fmt: skip
        model = self.task.build_model(make, dc.num_classes, index.channels, mc.head_settings())
        cuda_ddp = accelerator.device.type == "cuda" and not runtime.deepspeed_config_path(tc)
        optimizer = create_optimizer(model, cfg.optim, fused=tc.fused_optimizer and cuda_ddp)
        self.plan = [EpochPlan.of(cfg, epoch) for epoch in range(tc.epochs)]  # progressive resolution, if any
        self.train_labels = {s: cv_labels[s] for s in sorted(train_ids)}
        self.train_urls, self.soft_pseudo = index.urls("cv"), None
        if cfg.pseudo.labels:  # a pseudo-label round: the unlabelled images fold `job.fold`'s models were sure of
            self._add_pseudo_labelled()
        self.epoch_steps = [steps_per_epoch(len(self.train_labels), self.world, p.batch_size, tc.grad_accum_steps)
                            for p in self.plan]  # fmt: skip
        total_opt_steps = sum(self.epoch_steps) // tc.grad_accum_steps
        # On the plain torch optimizer: DeepSpeed's ZeRO optimizers keep its param_groups, so the LR set here
        # is the LR they use. (Warm restarts count epochs in mean optimizer steps per epoch.)
        self.scheduler = create_scheduler(optimizer, cfg.optim, total_steps=total_opt_steps,
                                          steps_per_epoch=max(1, total_opt_steps // tc.epochs))  # fmt: skip
        self.trainable = wrap(accelerator, model, optimizer, tc, grad_checkpointing=cfg.model.grad_checkpointing)
        self.channels_last = tc.channels_last and accelerator.device.type == "cuda"
        self.ema = create_ema(self.trainable.plain, tc.ema_decay, tc.ema_warmup)
        runtime.seed_everything(job.seed, per_rank=True)  # distinct augmentation / dropout streams per rank
        self.log(f"distrain: {job.id}: {self.trainable.describe()}")
        self.transform = resolve_transform(job.model, dc, index.channels, model)
        self.tta = TestTimeAugment.from_dict(dataclasses.asdict(cfg.tta))  # as meta.json stores it for serving
        workers = default_workers(
            dc.num_workers, len(index.cv_shards), self.world, runtime.cpus_per_process(accelerator)
        )
        self.loader_kw = dict(num_workers=workers, pin_memory=accelerator.device.type == "cuda")
        self.cache = fits_in_cache(len(index.sample_ids), self.transform, dc.cache_mb)
        self.train_batches = None  # started on an epoch's first step, at the resumed position
        self.stream_phase = -1  # the first epoch of the phase whose stream train_batches is
        self.val_loader = self.train_probe = None  # a whole-pool job validates on nothing
        if not job.whole_pool:
            # Built once per job: rebuilt every epoch, its DataLoader workers would start again every epoch.
            self.val_loader = self._eval_loader("cv", {s: cv_labels[s] for s in self.val_ids})
            # The train side of the train-val gap: the metric on a fixed, un-augmented sample of the training fold
            # as large as the validation fold (accuracy on augmented batches is not comparable with a val F1).
            probe = train_probe_ids(train_ids, len(self.val_ids), job)
            self.train_probe = self._eval_loader("cv", {s: cv_labels[s] for s in probe})
        self.batch_augment = BatchAugment(self.transform, cfg.augment, num_classes=dc.num_classes,
                                          label_smoothing=tc.label_smoothing, device=accelerator.device,
                                          label_sets=self.task.label_sets)  # fmt: skip
        self.criterion = self.task.create_loss(tc.loss_settings())  # takes Mixup / CutMix soft targets too
        self.teacher = None
        if cfg.distill.teacher:  # the teacher's rows of each batch's samples (fold m's, `study.soft_targets`)
            self._distil()
        self.nonfinite = _NonFiniteCounter(accelerator.device, tc.max_nonfinite_losses)
        self.evaluating: Optional[int] = None  # the epoch being evaluated, when it is
        self.epoch_local_sums = EpochSums()
        self.state = TrainState()
        self.resume_step = 0  # the step the first epoch after a resume starts at
        self.last_save = time.monotonic()

    def _add_pseudo_labelled(self) -> None:
        """Add the unlabelled samples fold `job.fold`'s ensemble was sure of to the training samples, with their
        class (or, with pseudo.soft, their ensemble rows as targets); their shards join the stream only when there
        are some, so a round that takes none trains as the first round did."""
        cfg, job = self.cfg, self.job
        pseudo = job_pseudo_labels(cfg, job)
        chosen = pseudo.selected(job.fold, cfg.pseudo.threshold, cfg.pseudo.min_votes)
        self.train_labels.update(chosen)
        if chosen:
            self.train_urls = [*self.train_urls, *unlabelled_urls(cfg.data.unlabelled)]
        if cfg.pseudo.soft:
            self.soft_pseudo = SoftPseudoTargets(pseudo, job.fold, cfg.pseudo, cfg.train.label_smoothing,
                                                 self.accelerator.device)  # fmt: skip

    def _distil(self) -> None:
        """The loss becomes `Distilled`: the hard-label loss and the soft-target loss against the teacher's rows."""
        dc = self.cfg.distill
        self.teacher = TeacherRows(Path(dc.teacher), self.index, self.cfg.cv.folds, self.job.fold,
                                   self.accelerator.device)  # fmt: skip
        self.criterion = Distilled(self.criterion, self.task.distillation_loss, dc.alpha, dc.temperature)

    def log(self, message: str) -> None:
        if self.accelerator.is_main_process:
            print(message, flush=True)

    # ---- resume and save -------------------------------------------------------------------------
    def resume(self) -> None:
        """Load the newest good checkpoint into the model, optimizer, scheduler, scaler and state, replay the
        data stream to its position and restore this rank's RNG. Starts from scratch when there is none."""
        saved = self._load_checkpoint()
        if saved is None:
            return
        self.scheduler.load_state_dict(saved["scheduler"])
        if self.ema is not None:
            self.ema.load_state_dict(saved["ema"])
        self.state.load_state_dict(saved)
        self.resume_step = self.state.step  # the data stream restarts at state.batches, without decoding before it
        set_rng_state(saved["rng"][self.accelerator.process_index])
        self.log(
            f"distrain: {self.job.id}: resumed from {saved['path']} (epoch {self.state.epoch}, "
            f"step {self.state.step}/{self.epoch_steps[self.state.epoch]})"
        )
        self.last_save = time.monotonic()

    def _load_checkpoint(self) -> Optional[dict]:
        state_dir, job = self.control.state_dir, self.job
        if state_dir is None:
            return None
        saved, path = load_latest_state(state_dir)
        if saved is None:
            return None
        if saved.get("job") != job.id or saved.get("world_size") != self.world:
            warnings.warn(
                f"distrain: {path} was saved by job {saved.get('job')} with {saved.get('world_size')} "
                f"processes; this is {job.id} with {self.world}: starting {job.id} from scratch",
                stacklevel=3,
            )
            return None
        try:
            self.trainable.load(state_dir / "deepspeed", saved)
        except FileNotFoundError as e:
            warnings.warn(f"distrain: {path}: {e}; starting {job.id} from scratch", stacklevel=3)
            return None
        saved["path"] = str(path)
        return saved

    def save(self) -> None:
        """Every rank contributes its RNG state (and, under ZeRO, its optimizer partition through the
        DeepSpeed engine); rank 0 then writes one checkpoint file (atomic, checksummed) that refers to it."""
        rngs = runtime.gather_rows(self.accelerator, [rng_state()])
        tag = f"state-{self.state.batches:09d}"  # the stem of the checkpoint file written below
        engine_state = self.trainable.save(self.control.state_dir / "deepspeed", tag)  # collective under ZeRO

        def write() -> None:
            checkpoint = {
                "format": STATE_FORMAT,
                "job": self.job.id,
                "world_size": self.world,
                **self.state.state_dict(),
                **engine_state,
                "scheduler": self.scheduler.state_dict(),
                "ema": {k: v.cpu() for k, v in self.ema.state_dict().items()} if self.ema is not None else None,
                "rng": rngs,
            }
            state_dir = self.control.state_dir
            save_state(
                state_dir, self.state.batches, checkpoint, self.control.scheduler.keep_checkpoints, self.control.fence
            )
            prune_engine_checkpoints(state_dir / "deepspeed", {p.stem for p in list_states(state_dir)})

        runtime.on_primary(self.accelerator, write)
        self.last_save = time.monotonic()

    def step_boundary(self, epoch: int, step: int, epoch_sums: Callable[[], EpochSums] = EpochSums) -> None:
        """Between optimizer steps: checkpoint when due, and stop (after a checkpoint) when asked. Ranks decide
        together, every `train.sync_every_steps` optimizer steps (and at each epoch's start), with a tiny
        all-reduce on the CPU control group: no device sync in the step, and they save and stop at the same step."""
        control = self.control
        steps = self.epoch_steps[min(epoch, len(self.epoch_steps) - 1)]
        control.progress.update(epoch=epoch, epochs=self.cfg.train.epochs, step=step, steps=steps)
        if control.state_dir is None and self.world == 1:
            if control.stop_requested():
                raise Interrupted(f"{self.job.id}: stop requested (no checkpoint directory)")
            return
        if self.world > 1 and (step // self.cfg.train.grad_accum_steps) % self.cfg.train.sync_every_steps:
            return  # not an agreement step: the ranks look at stop and save requests together a few steps on
        every_s = control.scheduler.checkpoint_every_s
        due = control.state_dir is not None and time.monotonic() - self.last_save >= every_s
        stop, due = float(control.stop_requested()), float(due and self.accelerator.is_main_process)
        if self.world > 1:
            stop, due = runtime.agree(self.accelerator, [stop, due])
        if (stop or due) and control.state_dir is not None:
            self.state.epoch, self.state.step, self.state.sums = epoch, step, epoch_sums()
            self.save()
        if stop:
            raise Interrupted(f"{self.job.id}: stopped at epoch {epoch} step {step} with its state saved")

    # ---- one epoch -------------------------------------------------------------------------------
    def train_epoch(self, epoch: int) -> EpochSums:
        """Train one pass over the fold's training samples (from the saved step after a resume); returns
        the epoch's training sums over every rank (the gradient norm's over rank 0's steps)."""
        tc, device, state = self.cfg.train, self.accelerator.device, self.state
        self.trainable.train()
        start_step, self.resume_step = self.resume_step, 0
        n_steps = self.epoch_steps[epoch]
        self._start_stream(epoch)
        sums = state.sums if start_step else EpochSums()
        # Running sums stay tensors: no per-step host round trip (a device sync on GPUs).
        loss_sum = torch.tensor(sums.loss_sum, device=device)
        correct = torch.tensor(sums.correct, device=device)
        grad_norm_sum = torch.tensor(sums.grad_norm_sum, device=device)
        seen, grad_norm_count = sums.seen, sums.grad_norm_count
        start = time.perf_counter() - sums.seconds

        def current_sums() -> EpochSums:  # read (host sync) only when a save happens
            return EpochSums(
                float(loss_sum),
                float(correct),
                float(grad_norm_sum),
                seen,
                grad_norm_count,
                time.perf_counter() - start,
            )

        steps = tqdm(
            range(start_step, n_steps),
            desc=f"epoch {epoch}",
            disable=not self.show_progress,
            leave=False,
            mininterval=1.0,
        )
        for step in steps:
            loss, logits, labels, stepped = self._micro_step()
            if stepped.boundary:
                grad_norm_sum += stepped.grad_norm.to(grad_norm_sum.device)
                grad_norm_count += 1
            finite = torch.isfinite(loss.detach())
            self.nonfinite.add(finite)
            if tc.max_nonfinite_losses and (step + 1) % self.nonfinite.check_every == 0:
                self.nonfinite.check(self.job, epoch, step)
            loss = torch.where(finite, loss.detach(), torch.zeros_like(loss))  # keep the epoch's mean readable
            loss_sum += loss.detach() * len(labels)
            correct += self.task.batch_correct(logits.detach(), labels)
            seen += len(labels)
            if (step + 1) % tc.grad_accum_steps == 0 and step + 1 < n_steps:
                self.step_boundary(epoch, step + 1, current_sums)
        train_seconds = time.perf_counter() - start
        self.nonfinite.check(self.job, epoch, n_steps - 1)
        state.nonfinite_losses += self.nonfinite.take_total()
        self.epoch_local_sums = current_sums()  # this rank's, as a save during the evaluation keeps them
        loss_total, correct_total, seen_total = runtime.sum_across_ranks(
            self.accelerator, [float(loss_sum), float(correct), seen]
        )
        return EpochSums(
            loss_total, correct_total, float(grad_norm_sum), int(seen_total), grad_norm_count, train_seconds
        )

    def _micro_step(self):
        """Draw one micro-batch and train on it; steps the LR schedule when the optimizer stepped."""
        device = self.accelerator.device
        images, labels, ids = next(self.train_batches)
        self.state.batches += 1
        labels = labels.to(device, non_blocking=True)
        inputs, targets = self.batch_augment(images.to(device, non_blocking=True), labels)
        if self.soft_pseudo is not None:  # the pseudo-labelled samples learn their fold ensemble's rows
            targets = self.soft_pseudo.of(ids, targets)
        if self.channels_last:  # the model's layout (`distributed.wrap`): no conversion inside every convolution
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        criterion = self.criterion
        if self.teacher is not None:
            criterion = functools.partial(self.criterion, teacher=self.teacher.of(ids))
        loss, logits, stepped = self.trainable.micro_step(inputs, targets, criterion)
        if stepped.boundary:
            if stepped.applied:
                self.scheduler.step()
                if self.ema is not None:  # the scheduler's count of applied steps drives the EMA warmup
                    self.ema.update(self.trainable.current_weights(), step=self.scheduler.last_epoch)
            else:
                self.state.skipped_steps += 1  # fp16 overflow: the loss scaler skipped this step
        return loss, logits, labels, stepped

    def _start_stream(self, epoch: int) -> None:
        """Keep the training stream when `epoch` continues its phase; else start the phase's stream (its own seed,
        image size and batch size) at this job's position in it: a resume lands mid-phase on the right batch."""
        first = self.plan[epoch].phase_start
        if self.train_batches is not None and first == self.stream_phase:
            return
        self.train_batches = None  # release the last phase's DataLoader workers first
        start_batch = self.state.batches - sum(self.epoch_steps[:first])
        plan, dc = self.plan[epoch], self.cfg.data
        seed = self.job.seed * 100 + self.job.fold + 7919 * first  # phase 0: the stream a job without phases has
        transform = dataclasses.replace(self.transform, image_size=plan.image_size)
        if self.task.dense:  # the sample's annotation becomes its target (DB maps), moved with the image
            decode = dense_train_decoder(self.index.annotations, plan.image_size, seed, self.cfg.augment.enabled)
        else:
            decode = train_decoder(transform, self.cfg.augment, seed, self.cache and plan.image_size == dc.image_size)
        loader = train_loader(self.train_urls, self.train_labels, batch_size=plan.batch_size, decode=decode,
                              shuffle_buffer=dc.shuffle_buffer, seed=seed, start_batch=start_batch,
                              num_workers=self.loader_kw["num_workers"])  # fmt: skip
        self.train_batches, self.stream_phase = iter(loader), first
        if epoch and epoch == first:
            self.log(f"distrain: {self.job.id}: epoch {epoch}: training at {plan.image_size} px, "
                     f"batch size {plan.batch_size}")  # fmt: skip

    def _eval_loader(self, split: str, labels: dict[str, int]):
        dc = self.cfg.data
        decode = dense_eval_decoder(self.index.annotations, dc.image_size, dc.num_classes) if self.task.dense else None
        return eval_loader(self.index.urls(split), labels, batch_size=self.cfg.train.batch_size * 2,
                           transform=self.transform, cache=self.cache, decode=decode, **self.loader_kw)  # fmt: skip

    def _predict(self, model: torch.nn.Module, loader) -> Predictions:
        """Predictions of `model`; during an epoch's evaluation a stop request ends the pass early and the job
        stops with the state of the end of that epoch's training (`_stop_if_asked_while_evaluating`)."""
        stop = self.control.stop_requested if self.evaluating is not None else _never
        pred = predict(model, self.accelerator, loader, self.transform, self.tta, self.task.activate, stop)
        if self.evaluating is not None:
            self._stop_if_asked_while_evaluating(self.evaluating)
        return pred

    def _stop_if_asked_while_evaluating(self, epoch: int) -> None:
        """SIGTERM while epoch `epoch` is evaluated: save the state of the end of its training (the evaluation runs
        again on resume: it draws no random numbers and changes no weights) and stop, instead of finishing a pass
        over 100k validation images that may outlast the grace period. The ranks agree, after each pass."""
        stop = float(self.control.stop_requested())
        if self.world > 1:
            (stop,) = runtime.agree(self.accelerator, [stop])
        if not stop:
            return
        if self.control.state_dir is not None:
            self.state.epoch, self.state.step, self.state.sums = epoch, self.epoch_steps[epoch], self.epoch_local_sums
            self.save()
        raise Interrupted(f"{self.job.id}: stopped while evaluating epoch {epoch}, with its state saved")

    def evaluate(self, epoch: int, train: EpochSums) -> dict[str, float]:
        """Score the fold's validation samples, log the epoch's row and keep the best epoch's weights and OOF."""
        if self.job.whole_pool:
            return self._keep_last(epoch, train)
        tc, state = self.cfg.train, self.state
        self.evaluating = epoch
        evaluated = self.trainable.eval_model()  # ZeRO: the fp32 weights gathered into a plain model
        val = self._predict(evaluated, self.val_loader)
        check_coverage(val, self.val_ids, f"{self.job.id} validation")
        val_score = val.score(tc.metric, self.task)
        train_metric = self._predict(evaluated, self.train_probe).score(tc.metric, self.task)
        row = {
            "train_loss": train.loss_sum / train.seen,
            "train_accuracy": train.correct / train.seen,  # on augmented batches, as the weights moved
            f"train_eval_{tc.metric}": train_metric,
            "val_loss": self.task.validation_loss(val.probs, val.labels),
            f"val_{tc.metric}": val_score,
            "train_val_gap": overfit_gap(tc.metric, train_metric, val_score),
            "lr": self.scheduler.get_last_lr()[0],
            "grad_norm": train.grad_norm_sum / max(1, train.grad_norm_count),
            "samples_per_s": train.seen / train.seconds,
            "skipped_steps": state.skipped_steps,
            "nonfinite_losses": state.nonfinite_losses,
        }
        candidates = [("raw", evaluated, val, val_score)]
        if self.ema is not None:  # the averaged weights compete with the raw ones for the best epoch
            ema_val = self._predict(self.ema.module, self.val_loader)
            row[f"val_ema_{tc.metric}"] = ema_val.score(tc.metric, self.task)
            candidates.append(("ema", self.ema.module, ema_val, row[f"val_ema_{tc.metric}"]))
        self.evaluating = None
        state.history.append({"epoch": epoch, **row})
        self._log_row(epoch, row)
        for source, model, pred, score in candidates:
            if improves(tc.metric, score, state.best.score):
                state.best.score, state.best.epoch, state.best.oof, state.best.source = score, epoch, pred, source
                state.best.state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        return row

    def _keep_last(self, epoch: int, train: EpochSums) -> dict[str, float]:
        """A whole-pool job's epoch (nothing to validate on): its training row, and its weights kept as the job's
        result (its epoch count was chosen on the folds); the EMA's when the job keeps one."""
        state = self.state
        row = {"train_loss": train.loss_sum / train.seen, "train_accuracy": train.correct / train.seen,
               "lr": self.scheduler.get_last_lr()[0], "grad_norm": train.grad_norm_sum / max(1, train.grad_norm_count),
               "samples_per_s": train.seen / train.seconds, "skipped_steps": state.skipped_steps,
               "nonfinite_losses": state.nonfinite_losses}  # fmt: skip
        state.history.append({"epoch": epoch, **row})
        self._log_row(epoch, row)
        model, source = (self.ema.module, "ema") if self.ema is not None else (self.trainable.eval_model(), "raw")
        empty = Predictions([], np.zeros((0, self.cfg.data.num_classes), np.float32), np.zeros(0, np.int64))
        state.best.epoch, state.best.oof, state.best.source = epoch, empty, source
        state.best.state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        return row

    def _log_row(self, epoch: int, row: dict[str, float]) -> None:
        if self.tracker is None:
            return

        def log() -> None:  # a stale owner (frozen past its lease, then woken) must not add a row to the run
            self.control.fence()
            self.tracker.log_metrics(self.run_id, row, step=self.control.first_step + epoch)

        runtime.on_primary(self.accelerator, log)

    def should_stop_early(self, epoch: int, row: dict[str, float]) -> bool:
        """train.patience epochs without a better score, or a train-val gap above train.max_train_val_gap."""
        tc = self.cfg.train
        if tc.patience and epoch - self.state.best.epoch >= tc.patience:
            return True
        return bool(tc.max_train_val_gap and row.get("train_val_gap", 0.0) > tc.max_train_val_gap)

    def finish(self) -> JobResult:
        """Predict the holdout test split with the best epoch's weights and hand back the job's result."""
        best = self.state.best
        final = self.trainable.plain
        final.load_state_dict(best.state)
        test = None
        if self.index.test_shards:
            loader = self._eval_loader("test", self.index.labels_of("test"))
            test = self._predict(final, loader)
            check_coverage(test, set(self.index.labels_of("test")), f"{self.job.id} test")
        runtime.release(self.accelerator)
        return JobResult(
            job=self.job,
            val_score=best.score,
            best_epoch=best.epoch,
            best_source=best.source,
            oof=best.oof,
            test=test,
            best_state=best.state,
            history=self.state.history,
        )
