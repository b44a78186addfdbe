"""Fit one job (one model, one seed, one fold): train, evaluate every epoch, keep the best weights,
and return out-of-fold (OOF) probabilities for the fold's validation samples and probabilities for
the holdout test split, keyed by sample id.

The same code runs as one CPU process, as 2 processes of DDP over gloo on CPU, and on N GPUs over
one or several nodes; everything rank-aware goes through `parallel`.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from distrain import data as data_mod
from distrain import parallel
from distrain.config import Config
from distrain.data import DatasetIndex
from distrain.metrics import score
from distrain.models import create_model
from distrain.optim import create_optimizer, create_scheduler
from distrain.tracking import NullTracker

if TYPE_CHECKING:
    from accelerate import Accelerator


@dataclass(frozen=True)
class Job:
    """One cell of the plan models x seeds x folds."""

    model: str
    seed: int
    fold: int

    @property
    def id(self) -> str:
        return f"{self.model}-s{self.seed}-f{self.fold}"


@dataclass
class Predictions:
    """Probabilities keyed by sample id, in a fixed (sorted by id) order."""

    sample_ids: list[str]
    probs: np.ndarray  # [n, num_classes] float32
    labels: np.ndarray  # [n] int64

    def score(self, metric: str) -> float:
        return score(metric, self.labels, self.probs)


@dataclass
class JobResult:
    job: Job
    val_score: float
    best_epoch: int
    oof: Predictions
    test: Optional[Predictions]
    best_state: dict  # fp32 state dict of the single-device model at its best epoch
    history: list[dict] = field(default_factory=list)


def expand_plan(cfg: Config) -> list[Job]:
    """models x seeds x folds, in that nesting order (so one backbone's jobs run together)."""
    folds = cfg.cv.only_folds or list(range(cfg.cv.folds))
    return [Job(m, s, f) for m in cfg.model.names for s in cfg.cv.seeds for f in folds]


def steps_per_epoch(n_train: int, world_size: int, batch_size: int, accum: int) -> int:
    """Micro-batches each rank takes per epoch: one pass over the fold's training samples in total,
    rounded down to whole optimizer steps. Raises ValueError if not even one step fits."""
    steps = (n_train // (world_size * batch_size)) // accum * accum
    if steps == 0:
        raise ValueError(f"train.batch_size={batch_size} x grad_accum_steps={accum} x {world_size} processes "
                         f"exceeds the {n_train} training samples of a fold")
    return steps


def fit_job(job: Job, cfg: Config, index: DatasetIndex, fold_of_sample: dict[str, int], accelerator: "Accelerator",
            tracker: NullTracker = NullTracker(), run_id: str = "") -> JobResult:
    """Train `job` to completion (or early stop) and predict OOF and test from its best epoch."""
    tc, dc = cfg.train, cfg.data
    primary = accelerator.is_main_process
    show_progress = primary and tc.progress
    cv_labels = index.labels_of("cv")
    val_ids = {s for s in cv_labels if fold_of_sample[s] == job.fold}
    train_ids = set(cv_labels) - val_ids
    world = accelerator.num_processes

    parallel.seed_everything(job.seed)  # identical initial weights on every rank
    model = create_model(job.model, num_classes=dc.num_classes, in_chans=index.channels,
                         drop_rate=cfg.model.drop_rate, grad_checkpointing=cfg.model.grad_checkpointing)
    optimizer = create_optimizer(model, cfg.optim)
    n_steps = steps_per_epoch(len(train_ids), world, tc.batch_size, tc.grad_accum_steps)
    opt_steps_per_epoch = n_steps // tc.grad_accum_steps
    scheduler = create_scheduler(optimizer, cfg.optim, total_steps=opt_steps_per_epoch * tc.epochs,
                                 steps_per_epoch=opt_steps_per_epoch)
    model, optimizer = parallel.wrap(accelerator, model, optimizer)
    parallel.seed_everything(job.seed, per_rank=True)  # distinct augmentation / dropout streams per rank
    single = accelerator.unwrap_model(model)

    loader_kw = dict(image_size=dc.image_size, channels=index.channels, num_workers=dc.num_workers, cache=dc.cache)
    train_batches = iter(data_mod.train_loader(index.urls("cv"), train_ids, batch_size=tc.batch_size,
                                               shuffle_buffer=dc.shuffle_buffer,
                                               seed=job.seed * 100 + job.fold, **loader_kw))
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=tc.label_smoothing)
    max_norm = tc.max_grad_norm if tc.max_grad_norm > 0 else math.inf
    # accelerate's autocast context costs time even when it casts nothing; skip it in fp32.
    autocast = accelerator.autocast if tc.precision != "no" else contextlib.nullcontext

    best = {"score": -math.inf, "epoch": -1, "state": None, "oof": None}
    history: list[dict] = []
    skipped_steps = 0
    epochs_bar = tqdm(range(tc.epochs), desc=job.id, disable=not show_progress, leave=False, dynamic_ncols=True)
    for epoch in epochs_bar:
        model.train()
        # Running sums stay tensors: no per-step host round trip (a device sync on GPUs).
        loss_sum = torch.zeros((), device=accelerator.device)
        correct = torch.zeros((), device=accelerator.device)
        grad_norm_sum = torch.zeros((), device=accelerator.device)
        seen = grad_norm_count = 0
        start = time.perf_counter()
        for _ in tqdm(range(n_steps), desc=f"epoch {epoch}", disable=not show_progress, leave=False, mininterval=1.0):
            images, labels, _ids = next(train_batches)
            images = data_mod.prepare_batch(images.to(accelerator.device, non_blocking=True), augment=dc.augment)
            labels = labels.to(accelerator.device, non_blocking=True)
            with accelerator.accumulate(model):
                with autocast():
                    logits = model(images)
                loss = criterion(logits.float(), labels)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    grad_norm_sum += accelerator.clip_grad_norm_(model.parameters(), max_norm).detach()
                    grad_norm_count += 1
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if accelerator.sync_gradients:
                    if accelerator.optimizer_step_was_skipped:
                        skipped_steps += 1  # fp16 overflow: the scaler skipped this step
                    else:
                        scheduler.step()
            loss_sum += loss.detach() * len(labels)
            correct += (logits.detach().argmax(1) == labels).sum()
            seen += len(labels)
        train_seconds = time.perf_counter() - start
        loss_sum, correct, seen = parallel.sum_across_ranks(accelerator, [float(loss_sum), float(correct), seen])

        val = predict(single, accelerator, index.urls("cv"), val_ids, batch_size=tc.batch_size, **loader_kw)
        _check_coverage(val, val_ids, f"{job.id} validation")
        val_score = val.score(tc.metric)
        train_metric = correct / seen  # accuracy on augmented batches as the weights moved
        row = {"train_loss": loss_sum / seen, "train_accuracy": train_metric,
               "val_loss": float(F.nll_loss(torch.log(torch.from_numpy(val.probs).clamp_min(1e-12)),
                                            torch.from_numpy(val.labels)).item()),
               f"val_{tc.metric}": val_score, "train_val_gap": train_metric - val_score,
               "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm_sum) / max(1, grad_norm_count),
               "samples_per_s": seen / train_seconds, "skipped_steps": skipped_steps}
        history.append({"epoch": epoch, **row})
        tracker.log_metrics(run_id, row, step=epoch)
        if val_score > best["score"]:
            best = {"score": val_score, "epoch": epoch, "oof": val,
                    "state": {k: v.detach().to("cpu", copy=True) for k, v in single.state_dict().items()}}
        epochs_bar.set_postfix(val=f"{val_score:.4f}", best=f"{best['score']:.4f}")
        if tc.patience and epoch - best["epoch"] >= tc.patience:
            break  # every rank sees the same gathered metric, so every rank stops together
        if tc.max_train_val_gap and row["train_val_gap"] > tc.max_train_val_gap:
            break

    single.load_state_dict(best["state"])
    test = None
    if index.test_shards:
        test_ids = set(index.labels_of("test"))
        test = predict(single, accelerator, index.urls("test"), None, batch_size=tc.batch_size, **loader_kw)
        _check_coverage(test, test_ids, f"{job.id} test")
    parallel.release(accelerator)
    return JobResult(job=job, val_score=best["score"], best_epoch=best["epoch"], oof=best["oof"], test=test,
                     best_state=best["state"], history=history)


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
