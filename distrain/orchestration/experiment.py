"""The main job as one worker runs it, in named phases:

    start      accelerator, data and folds, run directory, tracking         (`start_study`)
    work       claim jobs from the ledger and train each until none is left   (`worker.run_worker`, `JobRunner`)
    aggregate  the worker that finishes last writes report.json and the ensembles (`aggregation.aggregate_study`)
    finish     record how this worker ended, release the process group

One launch is one worker: every rank trains the job rank 0 claimed, as one DDP (or ZeRO) process group.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np

from distrain import interrupts
from distrain.config import Config
from distrain.console import route_library_output
from distrain.data.index import DatasetIndex, read_index
from distrain.data.loaders import check_shard_count
from distrain.data.pack import ensure_digits
from distrain.data.synth_shapes import ensure_synth_shapes
from distrain.data.synth_text import ensure_synth_text
from distrain.data.unlabelled import check_unlabelled
from distrain.distributed import runtime
from distrain.distributed.ranks import Ranks
from distrain.ensembles.store import SampleTruth
from distrain.errors import DataError, Interrupted, LeaseLost, Preempted
from distrain.fsutil import atomic_write_json
from distrain.names import JobStatus
from distrain.orchestration import phases
from distrain.orchestration.aggregation import Guards, aggregate_study
from distrain.orchestration.ledger import Claim, Heartbeat, JobState, Ledger, aggregate_id, default_worker_id
from distrain.orchestration.worker import WorkerOutcome, WorkerSteps, run_worker
from distrain.study.folds import FoldManifest, build_fold_manifest
from distrain.study.plan import Job, expand_plan
from distrain.study.pseudo_labels import read_pseudo_labels
from distrain.study.results import job_dir, job_files_problem
from distrain.study.soft_targets import read_soft_targets
from distrain.tasks import get_task
from distrain.tracking.base import NullTracker, Tracker
from distrain.training.loop import check_batches_fit
from distrain.training.models import check_inputs

if TYPE_CHECKING:
    from accelerate import Accelerator


@dataclass
class Study:
    """What every phase of one worker needs, built once by `start_study`."""

    cfg: Config
    accelerator: Accelerator
    index: DatasetIndex
    manifest: FoldManifest
    worker: str
    tracker: Tracker
    ledger: Ledger
    plan: list[Job]
    ranks: Ranks
    stop: threading.Event
    """Set on SIGTERM (`interrupts.STOP`): jobs stop at the next step boundary, aggregation before publishing."""

    @property
    def run_dir(self) -> Path:
        return self.cfg.run_dir


def run_experiment(cfg: Config, shard: Optional[tuple[int, int]] = None, new_run_dir: bool = False) -> int:
    """Prepare data, folds and tracking; claim and train jobs from the run directory's ledger until none
    is left; the worker that finishes last aggregates. Returns the exit code (`distrain.errors`)."""
    interrupts.install()  # SIGTERM during start-up: `Terminated` (the caller exits 75); nothing is claimed yet
    study = start_study(cfg, new_run_dir, shard, interrupts.STOP)
    with interrupts.deferred():  # from the first claim on, SIGTERM is honoured at step boundaries (exit 75)
        steps = WorkerSteps(JobRunner(study).run, lambda states, claim: aggregate(study, states, claim))
        outcome = claim_and_run(study, [j.id for j in study.plan], steps, shard)
        finish(study, outcome)
    return outcome.exit_code


def check_learned_inputs(cfg: Config, index: DatasetIndex, manifest: FoldManifest) -> None:
    """What a study learns from another study's models: a distilled study's soft targets, a pseudo-label round's
    unlabelled images and their labels; ConfigError in one line when they do not fit the data."""
    if cfg.distill.teacher:
        read_soft_targets(Path(cfg.distill.teacher), set(manifest.fold_of_sample), set(index.split_ids("test")),
                          len(index.classes), cfg.cv.folds)  # fmt: skip
    if cfg.data.unlabelled:
        unlabelled = check_unlabelled(cfg.data.unlabelled, index)
        if cfg.pseudo.labels:
            read_pseudo_labels(Path(cfg.pseudo.labels), set(unlabelled), cfg.data.num_classes, cfg.cv.folds)


def claim_and_run(
    study: Study, job_ids: list[str], steps: WorkerSteps, shard: Optional[tuple[int, int]] = None
) -> WorkerOutcome:
    """`worker.run_worker` over `job_ids` with the study's ledger, scheduler settings, ranks and stop event."""
    return run_worker(study.ledger, job_ids, study.cfg.scheduler, study.ranks, steps, worker=study.worker,
                      stop=study.stop, shard=shard)  # fmt: skip


def start_study(cfg: Config, new_run_dir: bool, shard: Optional[tuple[int, int]], stop: threading.Event) -> Study:
    """Accelerator, data and fold manifest, run directory and tracking: everything checked before a job runs."""
    accelerator = runtime.create_accelerator(cfg.train)
    ranks = Ranks(accelerator)
    if cfg.model.grad_checkpointing:
        from distrain.training.models import check_grad_checkpointing

        for name in cfg.model.names:
            check_grad_checkpointing(name, cfg.model)
    index, manifest = prepare_data(cfg, accelerator, ranks)
    check_inputs(cfg, index.channels, accelerator.device)  # every rank: the same check, the same one-line error
    check_batches_fit(cfg, manifest.fold_of_sample, accelerator.num_processes)
    check_learned_inputs(cfg, index, manifest)  # every rank: the same one-line refusal before any job starts
    if cfg.model.pretrained or cfg.model.pretrained_file:  # each node fills its hub cache once, or refuses
        from distrain.training.models import check_pretrained

        ranks.per_node(lambda: check_pretrained(cfg.model, num_classes=cfg.data.num_classes, in_chans=index.channels))
    chosen = ranks.primary(lambda: phases.prepare_run_dir(cfg, manifest, new_run_dir))
    if ranks.is_primary:
        route_library_output(chosen.run_dir)
    if chosen.experiment != cfg.experiment:
        ranks.log(f"distrain: {cfg.run_dir} holds another config; using {chosen.run_dir}")
    cfg = chosen
    worker = ranks.primary(default_worker_id)
    ranks.log(
        f"distrain: {cfg.experiment}: {len(manifest.fold_of_sample)} CV samples in {cfg.cv.folds} folds "
        f"(manifest {manifest.hash[:12]}), {len(index.split_ids('test'))} holdout test samples, "
        f"{accelerator.num_processes} process(es) on {accelerator.device.type}; worker {worker}"
        + (f", shard {shard[0]}/{shard[1]}" if shard else "")
    )
    tracker = _start_tracking_on_rank0(cfg, manifest, worker, ranks)
    ledger, plan = phases.open_ledger(cfg, cfg.run_dir), expand_plan(cfg)
    ranks.primary(lambda: phases.requeue_damaged_jobs(cfg.run_dir, ledger, plan, print))
    return Study(cfg, accelerator, index, manifest, worker, tracker, ledger, plan, ranks, stop)


def _start_tracking_on_rank0(cfg: Config, manifest: FoldManifest, worker: str, ranks: Ranks) -> Tracker:
    """Rank 0 opens the tracker (the others wait and get a NullTracker): the tracker itself holds a client
    that cannot be sent to other ranks."""
    opened: list[Tracker] = []
    ranks.primary(lambda: opened.append(phases.start_tracking(cfg, manifest, worker)))
    return opened[0] if opened else NullTracker()


def prepare_data(cfg: Config, accelerator: Accelerator, ranks: Ranks) -> tuple[DatasetIndex, FoldManifest]:
    """The data set's index (the digits written first if missing) and the study's fold manifest."""
    if cfg.data.source.startswith("digits"):  # each node's local primary writes them (nodes may not share a disk)
        ranks.per_node(lambda: ensure_digits(cfg.data.root, cfg.task))
    elif cfg.data.source == "synth_text":
        ranks.per_node(lambda: ensure_synth_text(cfg.data.root))
    elif cfg.data.source == "synth_shapes":
        ranks.per_node(lambda: ensure_synth_shapes(cfg.data.root))
    index = read_index(cfg.data.root, cfg.data.num_classes, cfg.task)  # every rank: same check, same error
    check_shard_count(index.cv_shards, accelerator.num_processes, cfg.data.num_workers, f"{cfg.data.root} cv split")
    cv_ids = index.split_ids("cv")
    cv_labels = index.labels_of("cv")
    groups = dict(zip(index.sample_ids, index.groups))
    try:
        strata = get_task(cfg.task).fold_strata(np.asarray([cv_labels[s] for s in cv_ids]), cfg.cv.folds)
        manifest = build_fold_manifest(cv_ids, strata, cfg.cv.folds, cfg.cv.fold_seed, [groups[s] for s in cv_ids])
    except DataError as e:
        raise DataError(f"{cfg.data.root}: {e}") from None
    return index, manifest


class JobRunner:
    """Trains one claimed job on every rank and, on rank 0, writes its outputs while it still owns it."""

    def __init__(self, study: Study):
        self.study, self.stop = study, study.stop

    def run(self, claim: Claim, beat: Heartbeat) -> None:
        from distrain.training.loop import JobControl, fit_job

        study = self.study
        cfg, job = study.cfg, next(j for j in study.plan if j.id == claim.job_id)
        if study.ranks.primary(lambda: job_files_problem(study.run_dir, job) is None):
            return  # outputs written by an attempt that died before recording it in the ledger
        run_id = study.tracker.start_job(
            job.id,
            phases.job_params(cfg, job),
            {"model": job.model, "seed": job.seed, "fold": job.fold, "attempt": claim.attempt, "worker": study.worker},
        )
        control = JobControl(
            state_dir=job_dir(study.run_dir, job) / "state",
            scheduler=cfg.scheduler,
            progress=beat.progress,
            stop_requested=lambda: self.stop.is_set() or beat.lost.is_set(),
            fence=lambda: study.ledger.fence(claim),
        )
        try:
            result = fit_job(
                job, cfg, study.index, study.manifest.fold_of_sample, study.accelerator, study.tracker, run_id, control
            )
        except LeaseLost:
            raise  # the job and its MLflow run belong to the new owner now: leave both alone
        except Interrupted:
            if study.ranks.primary(lambda: beat.lost.is_set()):  # all ranks agree why
                raise LeaseLost(str(claim)) from None
            study.tracker.end_run(run_id, "KILLED")
            raise Preempted(str(claim)) from None
        except BaseException as e:
            if study.ranks.is_primary and not isinstance(e, KeyboardInterrupt) and not study.ledger.owns(claim):
                # a stale owner (frozen, then woken) failing on files the new owner moved: not its run to end
                raise LeaseLost(f"{claim}: failed after losing the job ({type(e).__name__}: {e})") from None
            study.tracker.end_run(run_id, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
            raise
        if not study.ranks.primary(lambda: self._finish_job(claim, result, run_id)):
            raise LeaseLost(str(claim))

    def _finish_job(self, claim: Claim, result, run_id: str) -> bool:
        """Write the job's outputs and log them; False if another worker took the job over meanwhile."""
        from distrain.training.outputs import write_job_outputs

        study, tracker = self.study, self.study.tracker
        if not study.ledger.owns(claim):
            return False  # taken over by another worker meanwhile: its outputs, not ours
        out = write_job_outputs(study.run_dir, result, study.cfg.to_dict(), run_id)
        tracker.log_metrics(
            run_id,
            {f"best_val_{study.cfg.train.metric}": result.val_score, "best_epoch": result.best_epoch},
            step=result.best_epoch,
        )
        tracker.log_artifact(run_id, out / "best.pt", "checkpoint")
        for name in ("oof.npz", "test.npz"):
            if (out / name).exists():
                tracker.log_artifact(run_id, out / name, "predictions")
        tracker.end_run(run_id)
        shutil.rmtree(out / "state", ignore_errors=True)  # the finished job needs no training state
        return True


def aggregate(study: Study, states: list[JobState], claim: Claim) -> None:
    """The aggregation step (claimed like a job, run once): report.json, ensembles, the printed table; each
    write fenced by the claim, so an aggregator frozen past its lease publishes nothing when it wakes."""
    failed = [{"id": s.job_id, "error": s.last_error} for s in states if s.status == JobStatus.FAILED]
    labels = {**study.index.labels_of("cv"), **study.index.labels_of("test")}
    truth = SampleTruth(study.manifest.fold_of_sample, labels)

    def stop_point() -> None:  # SIGTERM while the ensembles were computed: publish nothing, hand the step back
        if study.stop.is_set():
            raise Preempted(f"{claim.job_id}: stopped by SIGTERM before publishing")

    def run() -> None:
        stop_point()
        grown = phases.grown_since(study.cfg, study.run_dir)
        if grown is not None:  # a worker started before `distrain train` grew the run directory
            study.ranks.log(f"distrain: {grown}")
            return
        guards = Guards(fence=lambda: study.ledger.fence(claim), stop_point=stop_point)
        aggregate_study(study.cfg, study.run_dir, study.tracker, truth, failed, guards=guards)

    study.ranks.primary(run)


def finish(study: Study, outcome: WorkerOutcome) -> None:
    """Record how this worker ended (for `distrain schedule` and people), say so, end the process group's work."""

    def record() -> None:
        row = {
            "worker": study.worker,
            "exit_code": outcome.exit_code,
            "trained": outcome.trained,
            "failed": outcome.failed,
            "preempted": outcome.preempted,
            "aggregated": outcome.aggregated,
            "time": time.time(),
        }
        atomic_write_json(study.ledger.root / "workers" / f"{study.worker.replace(':', '-')}.json", row)
        if not (outcome.trained or outcome.aggregated or outcome.preempted or outcome.failed):
            _say_nothing_was_trained(study)

    study.ranks.primary(record)
    if os.environ.get("DISTRAIN_WORKER_RESULT") and os.environ.get("LOCAL_RANK", "0") == "0":
        # for `distrain schedule` on each node: accelerate launch turns every failure into exit 1
        atomic_write_json(Path(os.environ["DISTRAIN_WORKER_RESULT"]), {"worker": study.worker,
                                                                       "exit_code": outcome.exit_code})  # fmt: skip
    if outcome.preempted:
        study.ranks.log(f"distrain: {study.worker}: stopped by SIGTERM; state saved, lease released (exit 75)")
    runtime.end_process_group(study.accelerator)


def _say_nothing_was_trained(study: Study) -> None:
    """A rerun of a finished run directory: show its report again and say why nothing was trained."""
    from distrain.ensembles.report import Report, format_table

    if study.ledger.state(aggregate_id([j.id for j in study.plan])).status != JobStatus.DONE:
        return  # other workers still train, or something failed (said above)
    report = Report.read(study.run_dir)
    if report is not None:
        print(format_table(report))
    print(
        f"distrain: nothing to train: all {len(study.plan)} jobs of {study.run_dir} are done with this config "
        f"(report: {study.run_dir / 'report.json'}); for a new run, set experiment=<name> or delete the "
        f"run directory",
        flush=True,
    )
