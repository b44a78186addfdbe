"""The main job: `accelerate launch distrain/run.py --config configs/digits.yaml [a.b=value ...]`.

One launch is one *worker*: it claims jobs (models x seeds x folds) from the run directory's ledger
and trains each as one DDP process group over all launched processes, until none is left. Start as
many workers as you like, on one node (`distrain schedule`) or many (Kubernetes); the one that
finishes last writes `runs/<experiment>/report.json` with the ensembles and prints a table.
Also reachable as `distrain train`.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if __name__ == "__main__" and __package__ in (None, ""):
    # Run as a file (accelerate launch distrain/run.py): the script's own folder must not shadow
    # top-level packages, and the repository root must be importable even without `pip install`.
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    sys.path.insert(0, str(here.parent))

EXIT_BAD_INPUT = 2


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="distrain train", description=__doc__.split("\n")[0])
    p.add_argument("--config", default=None, help="experiment YAML (default: all built-in defaults)")
    p.add_argument("--shard", default=None,
                   help="static mode: train only jobs i, i+n, ... of the plan (i/n); default: $JOB_COMPLETION_INDEX "
                        "with $DISTRAIN_NUM_SHARDS if set, else dynamic claiming")
    p.add_argument("--new-run-dir", action="store_true",
                   help="if the run directory holds another config, use <experiment>-2, -3, ... instead of refusing")
    # The `deepspeed` launcher appends --local_rank=N; LOCAL_RANK in the environment says the same.
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="a.b=value overrides, e.g. train.epochs=3 cv.seeds=[1,2]")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code: 0 all done, 1 a job or the aggregation failed,
    2 bad input, 75 stopped by SIGTERM with its state saved (see distrain.scheduler)."""
    args = parse_args(argv)
    from distrain.config import load_config
    from distrain.scheduler import parse_shard

    try:
        cfg = load_config(args.config, args.overrides)
        shard = parse_shard(args.shard)
        return run_experiment(cfg, shard=shard, new_run_dir=args.new_run_dir)
    except Exception as e:
        if not isinstance(e, (*bad_input_errors(), ValueError)):
            raise
        print(f"distrain: error: {e}", file=sys.stderr)
        if os.environ.get("DISTRAIN_WORKER_RESULT") and os.environ.get("RANK", "0") == "0":
            Path(os.environ["DISTRAIN_WORKER_RESULT"]).write_text('{"exit_code": 2}')
        return EXIT_BAD_INPUT


def bad_input_errors() -> tuple[type, ...]:
    """The bad-input exceptions of the distrain modules imported so far: one not imported cannot have
    raised, and importing them all up front (torch, scikit-learn, scipy) would make every refusal of a
    bad config take seconds longer."""
    owners = {"distrain.config": "ConfigError", "distrain.data": "DataError", "distrain.ensemble": "EnsembleError",
              "distrain.folds": "FoldManifestMismatch"}
    return tuple(getattr(sys.modules[m], name) for m, name in owners.items() if m in sys.modules)


def run_experiment(cfg, shard=None, new_run_dir: bool = False) -> int:
    """Prepare data, folds and tracking; claim and train jobs from the run directory's ledger until none
    is left; the worker that finishes last aggregates. Returns an exit code."""
    import dataclasses
    import shutil
    import signal
    import threading

    from distrain import parallel
    from distrain.aggregate import aggregate
    from distrain.config import config_differences, dump_yaml, flatten, yaml_load
    from distrain.data import DataError, check_shard_count, ensure_digits, read_index
    from distrain.engine import JobControl, JobInterrupted, fit_job
    from distrain.folds import build_fold_manifest, persist_or_check
    from distrain.fsutil import atomic_write_json, atomic_write_text
    from distrain.ledger import Ledger, default_worker_id
    from distrain.outputs import is_done, job_dir, write_job_outputs
    from distrain.plan import expand_plan
    from distrain.report import format_table
    from distrain.scheduler import LeaseLost, Preempted, run_worker
    from distrain.tracking import NullTracker, create_tracker, pending_calls, resolve_tracking_uri, sync_buffers

    # SIGTERM (Kubernetes preemption, spot reclaim): finish the current step, save, release, exit 75.
    stop = threading.Event()
    previous_handler = signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())

    accelerator = parallel.create_accelerator(cfg.train)
    if cfg.model.grad_checkpointing:
        from distrain.models import check_grad_checkpointing

        for name in cfg.model.names:
            check_grad_checkpointing(name)
    primary = accelerator.is_main_process
    log = (lambda m: print(m, flush=True)) if primary else (lambda m: None)

    def prepare_data():
        if cfg.data.source == "digits":
            ensure_digits(cfg.data.root)

    # Each node's local primary writes the digits shards if missing (nodes may not share a disk).
    parallel.on_primary(accelerator, prepare_data, per_node=True)
    index = read_index(cfg.data.root, num_classes=cfg.data.num_classes)  # every rank: same check, same error
    check_shard_count(index.cv_shards, accelerator.num_processes, cfg.data.num_workers, f"{cfg.data.root} cv split")
    cv_ids = index.split_ids("cv")
    cv_labels = index.labels_of("cv")
    groups = dict(zip(index.sample_ids, index.groups))
    try:
        manifest = build_fold_manifest(cv_ids, [cv_labels[s] for s in cv_ids], cfg.cv.folds, cfg.cv.fold_seed,
                                       groups=[groups[s] for s in cv_ids])
    except ValueError as e:
        raise DataError(f"{cfg.data.root}: {e}") from None

    def prepare_run_dir():
        experiment = cfg.experiment
        for n in range(2, 1000):
            run_dir = Path(cfg.run_root) / experiment
            saved = run_dir / "config.yaml"
            diffs = config_differences(yaml_load(saved.read_text()), cfg.to_dict()) if saved.exists() else []
            if not diffs:
                break
            if not new_run_dir:
                raise DataError(f"{run_dir} was run with another config ({'; '.join(diffs)}); use another "
                                f"experiment name, --new-run-dir, or delete the run directory")
            experiment = f"{cfg.experiment}-{n}"
        persist_or_check(manifest, run_dir / "folds.json")
        if not saved.exists():
            atomic_write_text(saved, dump_yaml(dataclasses.replace(cfg, experiment=experiment)))
        return experiment

    experiment = parallel.on_primary(accelerator, prepare_run_dir)
    if experiment != cfg.experiment:
        log(f"distrain: {cfg.run_dir} holds another config; using {Path(cfg.run_root) / experiment}")
        cfg = dataclasses.replace(cfg, experiment=experiment)
    run_dir = cfg.run_dir
    sc = cfg.scheduler
    worker = parallel.on_primary(accelerator, default_worker_id)
    log(f"distrain: {cfg.experiment}: {len(cv_ids)} CV samples in {cfg.cv.folds} folds "
        f"(manifest {manifest.hash[:12]}), {len(index.split_ids('test'))} holdout test samples, "
        f"{accelerator.num_processes} process(es) on {accelerator.device.type}; worker {worker}"
        + (f", shard {shard[0]}/{shard[1]}" if shard else ""))

    uri = resolve_tracking_uri(cfg.tracking.uri, cfg.run_root)
    trackers = {}

    def start_tracking():
        tracker = create_tracker(True, uri, cfg.tracking.experiment_name or cfg.experiment, run_dir,
                                 Path(cfg.run_root), timeout_s=cfg.tracking.timeout_s,
                                 max_retries=cfg.tracking.max_retries, worker=worker)
        tracker.log_params(tracker.parent_run_id, {"fold_manifest_hash": manifest.hash})
        tracker.log_artifact(tracker.parent_run_id, run_dir / "config.yaml")
        trackers["primary"] = tracker
        return None

    parallel.on_primary(accelerator, start_tracking)
    tracker = trackers.get("primary", NullTracker())

    plan = expand_plan(cfg)
    job_of = {job.id: job for job in plan}
    ledger = Ledger(run_dir, lease_timeout_s=sc.lease_timeout_s, max_retries=sc.max_retries,
                    max_lost_leases=sc.max_lost_leases)
    config_dict = cfg.to_dict()
    params = flatten(config_dict)

    def run_job(claim, beat) -> None:
        job = job_of[claim.job_id]
        if parallel.on_primary(accelerator, lambda: is_done(run_dir, job)):
            return  # outputs written by an attempt that died before recording it in the ledger
        run_id = tracker.start_job(job.id, {**params, "job.model": job.model, "job.seed": job.seed,
                                            "job.fold": job.fold},
                                   {"model": job.model, "seed": job.seed, "fold": job.fold,
                                    "attempt": claim.attempt, "worker": worker})
        control = JobControl(state_dir=job_dir(run_dir, job) / "state", checkpoint_every_s=sc.checkpoint_every_s,
                             keep_checkpoints=sc.keep_checkpoints, progress=beat.progress,
                             stop_requested=lambda: stop.is_set() or beat.lost.is_set())
        try:
            result = fit_job(job, cfg, index, manifest.fold_of_sample, accelerator, tracker, run_id, control)
        except JobInterrupted:
            lost = parallel.on_primary(accelerator, lambda: beat.lost.is_set())  # all ranks agree why
            tracker.end_run(run_id, "KILLED")
            raise (LeaseLost if lost else Preempted)(str(claim)) from None
        except BaseException as e:
            tracker.end_run(run_id, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
            raise

        def finish_job():
            if not ledger.owns(claim):
                return False  # taken over by another worker meanwhile: its outputs, not ours
            out = write_job_outputs(run_dir, result, config_dict, run_id)
            tracker.log_metrics(run_id, {f"best_val_{cfg.train.metric}": result.val_score,
                                         "best_epoch": result.best_epoch}, step=result.best_epoch)
            tracker.log_artifact(run_id, out / "best.pt", "checkpoint")
            for name in ("oof.npz", "test.npz"):
                if (out / name).exists():
                    tracker.log_artifact(run_id, out / name, "predictions")
            tracker.end_run(run_id)
            shutil.rmtree(out / "state", ignore_errors=True)  # the finished job needs no training state
            return True

        if not parallel.on_primary(accelerator, finish_job):
            raise LeaseLost(str(claim))

    def aggregate_all(states) -> None:
        failed = [{"id": s.job_id, "error": s.last_error} for s in states if s.status == "failed"]

        def run():
            report = aggregate(cfg, run_dir, tracker, manifest.fold_of_sample,
                               {**cv_labels, **index.labels_of("test")}, allow_partial=bool(failed),
                               failed_jobs=failed)
            tracker.end_run(tracker.parent_run_id)
            print(format_table(report))
            print(f"distrain: report: {run_dir / 'report.json'}")
            if failed:
                print(f"distrain: {len(failed)} job(s) failed: " + "; ".join(f"{f['id']}: {f['error']}" for f in failed))
            if getattr(tracker, "offline", False) and pending_calls(run_dir):
                try:  # the server may be back by now; if not, `distrain sync` later
                    tracker.offline = False
                    print(f"distrain: synced {sync_buffers(tracker)['synced']} buffered tracking calls")
                except Exception as e:
                    print(f"distrain: tracking still unreachable ({type(e).__name__}); run "
                          f"`distrain sync --run-dir {run_dir}` when it is back", file=sys.stderr)
            return None

        parallel.on_primary(accelerator, run)

    try:
        outcome = run_worker(ledger, [j.id for j in plan], worker=worker, run_job=run_job, aggregate=aggregate_all,
                             heartbeat_s=sc.heartbeat_s, poll_s=sc.poll_s, shard=shard,
                             wait_for_others=sc.wait_for_others, is_primary=primary,
                             coordinate=lambda fn: parallel.on_primary(accelerator, fn),
                             stop_requested=stop.is_set, log=log)
    finally:
        signal.signal(signal.SIGTERM, previous_handler)

    def record_worker():
        atomic_write_json(ledger.root / "workers" / f"{worker.replace(':', '-')}.json",
                          {"worker": worker, "exit_code": outcome.exit_code, "trained": outcome.trained,
                           "failed": outcome.failed, "preempted": outcome.preempted,
                           "aggregated": outcome.aggregated, "time": __import__("time").time()})
        return None

    parallel.on_primary(accelerator, record_worker)
    if primary and os.environ.get("DISTRAIN_WORKER_RESULT"):  # for `distrain schedule`: accelerate launch
        atomic_write_json(Path(os.environ["DISTRAIN_WORKER_RESULT"]),  # turns every failure into exit 1
                          {"worker": worker, "exit_code": outcome.exit_code})
    if outcome.preempted:
        log(f"distrain: {worker}: stopped by SIGTERM; state saved, lease released (exit 75)")
    accelerator.end_training()
    return outcome.exit_code


if __name__ == "__main__":
    sys.exit(main())
