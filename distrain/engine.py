"""Fit one job (one model, one seed, one fold): train, evaluate every epoch, keep the best weights,
and return out-of-fold (OOF) probabilities for the fold's validation samples and probabilities for
the holdout test split, keyed by sample id.

The same code runs as one CPU process, as 2 processes of DDP over gloo on CPU, and on N GPUs over
one or several nodes; everything rank-aware goes through `parallel`.
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from distrain import data as data_mod
from distrain import parallel
from distrain.checkpoint import list_states, load_latest_state, rng_state, save_state, set_rng_state
from distrain.config import Config
from distrain.data import DatasetIndex
from distrain.models import create_model
from distrain.optim import create_optimizer, create_scheduler
from distrain.plan import Job, JobResult, Predictions
from distrain.tracking import NullTracker

if TYPE_CHECKING:
    from accelerate import Accelerator


@dataclass
class JobControl:
    """How the caller steers a running job: where its full training state is checkpointed and how
    often, when it must stop (SIGTERM, a lost lease), and a dict it reads progress from (heartbeats)."""

    state_dir: Optional[Path] = None
    """Directory of this job's training-state checkpoints; None: no checkpoints, no resume."""
    checkpoint_every_s: float = 300.0
    """Save at the first optimizer-step boundary after this many seconds since the last save."""
    keep_checkpoints: int = 2
    stop_requested: Callable[[], bool] = lambda: False
    """This rank's wish to stop; any rank's wish stops all ranks at the same step, after a save."""
    progress: dict = field(default_factory=dict)


class JobInterrupted(Exception):
    """fit_job stopped because `stop_requested` turned true; its training state was saved first."""


class NonFiniteLoss(RuntimeError):
    """Too many consecutive NaN/inf losses (train.max_nonfinite_losses): the run diverged."""


def steps_per_epoch(n_train: int, world_size: int, batch_size: int, accum: int) -> int:
    """Micro-batches each rank takes per epoch: one pass over the fold's training samples in total,
    rounded down to whole optimizer steps. Raises ValueError if not even one step fits."""
    steps = (n_train // (world_size * batch_size)) // accum * accum
    if steps == 0:
        raise ValueError(f"train.batch_size={batch_size} x grad_accum_steps={accum} x {world_size} processes "
                         f"exceeds the {n_train} training samples of a fold")
    return steps


def fit_job(job: Job, cfg: Config, index: DatasetIndex, fold_of_sample: dict[str, int], accelerator: "Accelerator",
            tracker: NullTracker = NullTracker(), run_id: str = "", control: Optional[JobControl] = None) -> JobResult:
    """Train `job` to completion (or early stop) and predict OOF and test from its best epoch.

    With `control.state_dir`, the full training state is checkpointed there and a later call resumes
    from the newest good checkpoint: same weights, optimizer, schedule, every rank's RNG and data
    position, so a resumed job ends bit-identical to an uninterrupted one (with deterministic kernels).
    """
    control = control or JobControl()
    tc, dc = cfg.train, cfg.data
    primary = accelerator.is_main_process
    show_progress = primary and tc.progress
    cv_labels = index.labels_of("cv")
    val_ids = {s for s in cv_labels if fold_of_sample[s] == job.fold}
    train_ids = set(cv_labels) - val_ids
    world = accelerator.num_processes

    parallel.seed_everything(job.seed)  # identical initial weights on every rank
    model = create_model(job.model, num_classes=dc.num_classes, in_chans=index.channels, drop_rate=cfg.model.drop_rate)
    optimizer = create_optimizer(model, cfg.optim)
    n_steps = steps_per_epoch(len(train_ids), world, tc.batch_size, tc.grad_accum_steps)
    opt_steps_per_epoch = n_steps // tc.grad_accum_steps
    # On the plain torch optimizer: DeepSpeed's ZeRO optimizers keep its param_groups, so the LR set here
    # is the LR they use.
    scheduler = create_scheduler(optimizer, cfg.optim, total_steps=opt_steps_per_epoch * tc.epochs,
                                 steps_per_epoch=opt_steps_per_epoch)
    trainable = parallel.wrap(accelerator, model, optimizer, tc, grad_checkpointing=cfg.model.grad_checkpointing)
    parallel.seed_everything(job.seed, per_rank=True)  # distinct augmentation / dropout streams per rank
    if primary:
        print(f"distrain: {job.id}: {trainable.describe()}", flush=True)

    loader_kw = dict(image_size=dc.image_size, channels=index.channels, num_workers=dc.num_workers, cache=dc.cache)
    train_batches = iter(data_mod.train_loader(index.urls("cv"), train_ids, batch_size=tc.batch_size,
                                               shuffle_buffer=dc.shuffle_buffer,
                                               seed=job.seed * 100 + job.fold, **loader_kw))
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=tc.label_smoothing)

    # Everything a resumed job needs besides weights, optimizer, schedule and RNG.
    progress = {"epoch": 0, "step": 0, "batches": 0, "skipped_steps": 0, "nonfinite_losses": 0, "history": [],
                "best": {"score": -math.inf, "epoch": -1, "state": None, "oof": None},
                "sums": _zero_sums()}
    resumed = _resume(control, job, world, trainable, scheduler, progress)
    if resumed:
        for _ in range(progress["batches"]):  # replay the data stream (no compute) to the saved position
            next(train_batches)
        set_rng_state(resumed["rng"][accelerator.process_index])
        if primary:
            print(f"distrain: {job.id}: resumed from {resumed['path']} (epoch {progress['epoch']}, "
                  f"step {progress['step']}/{n_steps})", flush=True)
    best, history = progress["best"], progress["history"]
    last_save = time.monotonic()

    def step_boundary(epoch: int, step: int, epoch_sums: Callable[[], dict] = _zero_sums) -> None:
        """Between optimizer steps: checkpoint when due, and stop (after a checkpoint) when asked.
        Ranks decide together (one tiny all-reduce), so they save and stop at the same step."""
        nonlocal last_save
        control.progress.update(epoch=epoch, epochs=tc.epochs, step=step, steps=n_steps)
        if control.state_dir is None and world == 1:
            if control.stop_requested():
                raise JobInterrupted(f"{job.id}: stop requested (no checkpoint directory)")
            return
        due = control.state_dir is not None and time.monotonic() - last_save >= control.checkpoint_every_s
        stop, due = (float(control.stop_requested()), float(due and primary))
        if world > 1:
            stop, due = parallel.sum_across_ranks(accelerator, [stop, due])
        if (stop or due) and control.state_dir is not None:
            progress.update(epoch=epoch, step=step, sums=epoch_sums())
            _save(control, job, world, accelerator, trainable, scheduler, progress)
            last_save = time.monotonic()
        if stop:
            raise JobInterrupted(f"{job.id}: stopped at epoch {epoch} step {step} with its state saved")

    epochs_bar = tqdm(range(progress["epoch"], tc.epochs), desc=job.id, disable=not show_progress, leave=False,
                      dynamic_ncols=True)
    # Consecutive non-finite losses, kept on the device and read every few steps (no per-step host sync).
    nonfinite_run = torch.zeros((), device=accelerator.device)
    nonfinite_worst = torch.zeros((), device=accelerator.device)
    nonfinite_total = torch.zeros((), device=accelerator.device)
    check_every = max(1, min(8, tc.max_nonfinite_losses or 8))
    for epoch in epochs_bar:
        trainable.train()
        start_step = progress["step"] if epoch == progress["epoch"] else 0
        if start_step == 0:
            progress["sums"] = _zero_sums()
        sums = progress["sums"]
        # Running sums stay tensors: no per-step host round trip (a device sync on GPUs).
        loss_sum = torch.tensor(sums["loss_sum"], device=accelerator.device)
        correct = torch.tensor(sums["correct"], device=accelerator.device)
        grad_norm_sum = torch.tensor(sums["grad_norm_sum"], device=accelerator.device)
        seen, grad_norm_count = sums["seen"], sums["grad_norm_count"]
        start = time.perf_counter() - sums["seconds"]
        step_bar = tqdm(range(start_step, n_steps), desc=f"epoch {epoch}", disable=not show_progress, leave=False,
                        mininterval=1.0)
        for step in step_bar:
            images, labels, _ids = next(train_batches)
            progress["batches"] += 1
            images = data_mod.prepare_batch(images.to(accelerator.device, non_blocking=True), augment=dc.augment)
            labels = labels.to(accelerator.device, non_blocking=True)
            loss, logits, stepped = trainable.micro_step(images, labels, criterion)
            if stepped.boundary:
                grad_norm_sum += stepped.grad_norm.to(grad_norm_sum.device)
                grad_norm_count += 1
                if stepped.applied:
                    scheduler.step()
                else:
                    progress["skipped_steps"] += 1  # fp16 overflow: the loss scaler skipped this step
            finite = torch.isfinite(loss.detach())
            nonfinite_run = (nonfinite_run + 1) * (~finite)
            nonfinite_worst = torch.maximum(nonfinite_worst, nonfinite_run)
            nonfinite_total += ~finite
            if tc.max_nonfinite_losses and (step + 1) % check_every == 0:
                _check_nonfinite(job, epoch, step, float(nonfinite_worst), tc)
            loss = torch.where(finite, loss.detach(), torch.zeros_like(loss))  # keep the epoch's mean readable
            loss_sum += loss.detach() * len(labels)
            correct += (logits.detach().argmax(1) == labels).sum()
            seen += len(labels)
            if (step + 1) % tc.grad_accum_steps == 0 and step + 1 < n_steps:
                step_boundary(epoch, step + 1, lambda: {  # read (host sync) only when a save happens
                    "loss_sum": float(loss_sum), "correct": float(correct), "grad_norm_sum": float(grad_norm_sum),
                    "seen": seen, "grad_norm_count": grad_norm_count, "seconds": time.perf_counter() - start})
        train_seconds = time.perf_counter() - start
        if tc.max_nonfinite_losses:
            _check_nonfinite(job, epoch, n_steps - 1, float(nonfinite_worst), tc)
        progress["nonfinite_losses"] += int(nonfinite_total)
        nonfinite_total.zero_()
        loss_sum, correct, seen = parallel.sum_across_ranks(accelerator, [float(loss_sum), float(correct), seen])

        evaluated = trainable.eval_model()  # ZeRO: the fp32 weights gathered into a plain model
        val = predict(evaluated, accelerator, index.urls("cv"), val_ids, batch_size=tc.batch_size, **loader_kw)
        _check_coverage(val, val_ids, f"{job.id} validation")
        val_score = val.score(tc.metric)
        train_metric = correct / seen  # accuracy on augmented batches as the weights moved
        row = {"train_loss": loss_sum / seen, "train_accuracy": train_metric,
               "val_loss": float(F.nll_loss(torch.log(torch.from_numpy(val.probs).clamp_min(1e-12)),
                                            torch.from_numpy(val.labels)).item()),
               f"val_{tc.metric}": val_score, "train_val_gap": train_metric - val_score,
               "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm_sum) / max(1, grad_norm_count),
               "samples_per_s": seen / train_seconds, "skipped_steps": progress["skipped_steps"],
               "nonfinite_losses": progress["nonfinite_losses"]}
        history.append({"epoch": epoch, **row})
        tracker.log_metrics(run_id, row, step=epoch)
        if val_score > best["score"]:
            best.update(score=val_score, epoch=epoch, oof=val,
                        state={k: v.detach().to("cpu", copy=True) for k, v in evaluated.state_dict().items()})
        epochs_bar.set_postfix(val=f"{val_score:.4f}", best=f"{best['score']:.4f}")
        if tc.patience and epoch - best["epoch"] >= tc.patience:
            break  # every rank sees the same gathered metric, so every rank stops together
        if tc.max_train_val_gap and row["train_val_gap"] > tc.max_train_val_gap:
            break
        if epoch + 1 < tc.epochs:
            step_boundary(epoch + 1, 0)

    final = trainable.plain
    final.load_state_dict(best["state"])
    test = None
    if index.test_shards:
        test_ids = set(index.labels_of("test"))
        test = predict(final, accelerator, index.urls("test"), None, batch_size=tc.batch_size, **loader_kw)
        _check_coverage(test, test_ids, f"{job.id} test")
    parallel.release(accelerator)
    return JobResult(job=job, val_score=best["score"], best_epoch=best["epoch"], oof=best["oof"], test=test,
                     best_state=best["state"], history=history)


def _zero_sums() -> dict:
    return {"loss_sum": 0.0, "correct": 0.0, "grad_norm_sum": 0.0, "seen": 0, "grad_norm_count": 0, "seconds": 0.0}


def _check_nonfinite(job: Job, epoch: int, step: int, worst_run: float, tc) -> None:
    """Hard stop once `tc.max_nonfinite_losses` consecutive micro-batch losses were NaN/inf."""
    if worst_run >= tc.max_nonfinite_losses:
        raise NonFiniteLoss(f"{job.id}: {int(worst_run)} consecutive non-finite losses by epoch {epoch} step {step} "
                            f"(train.max_nonfinite_losses={tc.max_nonfinite_losses}); lower optim.lr, raise "
                            f"train.max_grad_norm clipping, or use bf16 instead of fp16")


def _save(control: JobControl, job: Job, world: int, accelerator: "Accelerator", trainable, scheduler,
          progress: dict) -> None:
    """Every rank contributes its RNG state (and, under ZeRO, its optimizer partition through the
    DeepSpeed engine); rank 0 then writes one checkpoint file (atomic, checksummed) that refers to it."""
    rngs = parallel.gather_rows(accelerator, [rng_state()])
    tag = f"state-{progress['batches']:09d}"  # the stem of the checkpoint file written below
    engine_state = trainable.save(control.state_dir / "deepspeed", tag)  # collective under ZeRO

    def write():
        best = progress["best"]
        oof = best["oof"]
        state = {
            "format": "distrain-state/1", "job": job.id, "world_size": world,
            "epoch": progress["epoch"], "step": progress["step"], "batches": progress["batches"],
            "skipped_steps": progress["skipped_steps"], "nonfinite_losses": progress["nonfinite_losses"],
            "sums": progress["sums"], "history": progress["history"],
            **engine_state, "scheduler": scheduler.state_dict(), "rng": rngs,
            "best": {"score": best["score"], "epoch": best["epoch"], "state": best["state"],
                     "oof": None if oof is None else {"sample_ids": list(oof.sample_ids),
                                                      "probs": torch.from_numpy(oof.probs),
                                                      "labels": torch.from_numpy(oof.labels)}},
        }
        save_state(control.state_dir, progress["batches"], state, keep=control.keep_checkpoints)
        kept = {p.stem for p in list_states(control.state_dir)}
        trainable.prune(control.state_dir / "deepspeed", kept)
        return None

    parallel.on_primary(accelerator, write)


def _resume(control: JobControl, job: Job, world: int, trainable, scheduler, progress: dict) -> Optional[dict]:
    """Load the newest good checkpoint into the model, optimizer, scheduler, scaler and `progress`.
    Returns the loaded state (with its "path"), or None when starting from scratch."""
    if control.state_dir is None:
        return None
    state, path = load_latest_state(control.state_dir)
    if state is None:
        return None
    if state.get("job") != job.id or state.get("world_size") != world:
        warnings.warn(f"distrain: {path} was saved by job {state.get('job')} with {state.get('world_size')} "
                      f"processes; this is {job.id} with {world}: starting {job.id} from scratch", stacklevel=2)
        return None
    try:
        trainable.load(control.state_dir / "deepspeed", state)
    except FileNotFoundError as e:
        warnings.warn(f"distrain: {path}: {e}; starting {job.id} from scratch", stacklevel=2)
        return None
    scheduler.load_state_dict(state["scheduler"])
    best = state["best"]
    oof = best["oof"]
    progress.update(epoch=state["epoch"], step=state["step"], batches=state["batches"],
                    skipped_steps=state["skipped_steps"], nonfinite_losses=state.get("nonfinite_losses", 0),
                    sums=state["sums"], history=state["history"],
                    best={"score": best["score"], "epoch": best["epoch"], "state": best["state"],
                          "oof": None if oof is None else Predictions(oof["sample_ids"], oof["probs"].numpy(),
                                                                      oof["labels"].numpy())})
    state["path"] = str(path)
    return state


@torch.no_grad()
def predict(model: torch.nn.Module, accelerator: "Accelerator", urls: list[str], keep_ids: Optional[set[str]], *,
            batch_size: int, image_size: int, channels: int, num_workers: int, cache: bool = True) -> Predictions:
    """Softmax probabilities for the samples in `urls` (restricted to keep_ids), each rank predicting its own
    shards, gathered on every rank and sorted by sample id."""
    was_training = model.training
    model.eval()
    rows = []
    loader = data_mod.eval_loader(urls, keep_ids, batch_size=batch_size * 2, image_size=image_size,
                                  channels=channels, num_workers=num_workers, cache=cache)
    for images, labels, ids in loader:
        with accelerator.autocast():
            logits = model(data_mod.prepare_batch(images.to(accelerator.device), augment=False))
        probs = torch.softmax(logits.float(), dim=1).cpu().numpy()
        rows.extend(zip(ids, probs, labels.tolist()))
    model.train(was_training)
    rows = parallel.gather_rows(accelerator, rows)
    rows.sort(key=lambda r: r[0])
    if not rows:
        return Predictions([], np.zeros((0, 0), np.float32), np.zeros(0, np.int64))
    return Predictions(sample_ids=[r[0] for r in rows], probs=np.stack([r[1] for r in rows]).astype(np.float32),
                       labels=np.asarray([r[2] for r in rows], dtype=np.int64))


def _check_coverage(pred: Predictions, expected: set[str], what: str) -> None:
    """Every expected sample predicted exactly once: no padding duplicates, nothing dropped."""
    if len(pred.sample_ids) != len(set(pred.sample_ids)) or set(pred.sample_ids) != expected:
        raise RuntimeError(f"{what}: predicted {len(pred.sample_ids)} rows for {len(expected)} samples "
                           f"({len(set(pred.sample_ids))} distinct); shards and index disagree")
