"""The main job: `accelerate launch distrain/run.py --config configs/digits.yaml [a.b=value ...]`.

Runs every job of the plan (models x seeds x folds) that is not done yet, each as one DDP process
group over all launched processes, then writes `runs/<experiment>/report.json` and prints a table.
Also reachable as `distrain train`.
"""
from __future__ import annotations

import argparse
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
    p.add_argument("overrides", nargs="*", help="a.b=value overrides, e.g. train.epochs=3 cv.seeds=[1,2]")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code (0 ok, 2 bad input, 1 failure while training)."""
    args = parse_args(argv)
    from distrain.config import ConfigError, load_config
    from distrain.data import DataError
    from distrain.ensemble import EnsembleError
    from distrain.folds import FoldManifestMismatch

    try:
        cfg = load_config(args.config, args.overrides)
        return run_experiment(cfg)
    except (ConfigError, DataError, FoldManifestMismatch, EnsembleError) as e:
        print(f"distrain: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT


def run_experiment(cfg) -> int:
    """Prepare data, folds and tracking; train the pending jobs; aggregate. Returns an exit code."""
    from distrain import parallel
    from distrain.config import config_differences, dump_yaml, flatten
    from distrain.data import DataError, check_shard_count, read_index, write_digits
    from distrain.engine import expand_plan, fit_job
    from distrain.folds import build_fold_manifest, persist_or_check
    from distrain.fsutil import atomic_write_text
    from distrain.outputs import is_done, write_job_outputs
    from distrain.aggregate import aggregate
    from distrain.report import format_table
    from distrain.tracking import NullTracker, create_tracker, resolve_tracking_uri
    from distrain.config import yaml_load

    accelerator = parallel.create_accelerator(cfg.train)
    primary = accelerator.is_main_process
    run_dir = cfg.run_dir

    def prepare_data():
        root = Path(cfg.data.root)
        if cfg.data.source == "digits" and not (root / "index.json").exists():
            write_digits(root)
        return None

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
        saved = run_dir / "config.yaml"
        if saved.exists():
            diffs = config_differences(yaml_load(saved.read_text()), cfg.to_dict())
            if diffs:
                raise DataError(f"{run_dir} was run with another config ({'; '.join(diffs)}); "
                                f"use another experiment name or delete the run directory")
        persist_or_check(manifest, run_dir / "folds.json")
        atomic_write_text(saved, dump_yaml(cfg))
        return None

    parallel.on_primary(accelerator, prepare_run_dir)
    if primary:
        print(f"distrain: {cfg.experiment}: {len(cv_ids)} CV samples in {cfg.cv.folds} folds "
              f"(manifest {manifest.hash[:12]}), {len(index.split_ids('test'))} holdout test samples, "
              f"{accelerator.num_processes} process(es) on {accelerator.device.type}", flush=True)

    uri = resolve_tracking_uri(cfg.tracking.uri, cfg.run_root)
    trackers = {}

    def start_tracking():
        tracker = create_tracker(True, uri, cfg.tracking.experiment_name or cfg.experiment, run_dir,
                                 Path(cfg.run_root))
        tracker.log_params(tracker.parent_run_id, {"fold_manifest_hash": manifest.hash,
                                                   "num_processes": accelerator.num_processes})
        tracker.log_artifact(tracker.parent_run_id, run_dir / "config.yaml")
        trackers["primary"] = tracker
        return None

    parallel.on_primary(accelerator, start_tracking)
    tracker = trackers.get("primary", NullTracker())

    plan = expand_plan(cfg)
    pending = parallel.on_primary(accelerator, lambda: [j for j in plan if not is_done(run_dir, j)])
    config_dict = cfg.to_dict()
    params = flatten(config_dict)
    for n, job in enumerate(pending, 1):
        if primary:
            print(f"distrain: job {n}/{len(pending)}: {job.id}", flush=True)
        run_id = tracker.start_job(job.id, {**params, "job.model": job.model, "job.seed": job.seed,
                                            "job.fold": job.fold},
                                   {"model": job.model, "seed": job.seed, "fold": job.fold})
        try:
            result = fit_job(job, cfg, index, manifest.fold_of_sample, accelerator, tracker, run_id)
        except BaseException as e:
            tracker.end_run(run_id, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
            raise

        def finish_job():
            out = write_job_outputs(run_dir, result, config_dict, run_id)
            tracker.log_metrics(run_id, {f"best_val_{cfg.train.metric}": result.val_score,
                                         "best_epoch": result.best_epoch}, step=result.best_epoch)
            tracker.log_artifact(run_id, out / "best.pt", "checkpoint")
            for name in ("oof.npz", "test.npz"):
                if (out / name).exists():
                    tracker.log_artifact(run_id, out / name, "predictions")
            tracker.end_run(run_id)
            return None

        parallel.on_primary(accelerator, finish_job)

    def aggregate_once():
        report = aggregate(cfg, run_dir, tracker, manifest.fold_of_sample,
                           {**cv_labels, **index.labels_of("test")})
        tracker.end_run(tracker.parent_run_id)
        print(format_table(report))
        print(f"distrain: report: {run_dir / 'report.json'}")
        return None

    parallel.on_primary(accelerator, aggregate_once)
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
