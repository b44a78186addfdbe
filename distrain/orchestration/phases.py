"""The phases of an experiment that touch the run directory, shared by the main job (`experiment`) and
the `distrain` commands (`cli`): choose and prepare the run directory, open its ledger and tracker,
and requeue damaged jobs. Torch-free, so `distrain status` stays fast (aggregating is `aggregation`).

A run directory `<run_root>/<experiment>/` holds `config.yaml`, `folds.json`, `ledger/`, `jobs/`,
`ensemble/`, `report.json`, `mlflow.json` and, while MLflow was unreachable, `tracking-buffer/`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from distrain.config import Config, apply_overrides, config_from_dict, dump_yaml, flatten, yaml_load
from distrain.errors import BadInput, ConfigError, DataError
from distrain.fsutil import atomic_write_text
from distrain.names import JobStatus
from distrain.orchestration.growth import growth_differences
from distrain.orchestration.ledger import Ledger
from distrain.study.plan import Job
from distrain.tracking.base import Tracker

if TYPE_CHECKING:
    from distrain.ensembles.report import Report
    from distrain.study.folds import FoldManifest


def load_run_dir(run_dir: Path) -> Config:
    """The config a run directory was started with. Raises DataError for a folder that is not one."""
    saved = run_dir / "config.yaml"
    if not saved.is_file() or not (run_dir / "folds.json").is_file():
        raise DataError(f"{run_dir}: not a distrain run directory (no config.yaml / folds.json)")
    return config_from_dict(yaml_load(saved.read_text()), check_models=False)  # checked when the run began


def reconfigure_ensembles(run_dir: Path, overrides: list[str]) -> Config:
    """The run directory's config with `ensemble.*` overrides (members, selection, stacking settings) applied
    and saved, for aggregating a finished study again; any other key is refused (the jobs depended on it)."""
    cfg = load_run_dir(run_dir)
    if not overrides:
        return cfg
    check_ensemble_overrides(overrides)
    cfg = config_from_dict(apply_overrides(cfg.to_dict(), overrides), check_models=False)
    atomic_write_text(run_dir / "config.yaml", dump_yaml(cfg))
    return cfg


def check_ensemble_overrides(overrides: list[str]) -> None:
    """ConfigError for an override outside `ensemble.*`: re-aggregating cannot change what the jobs trained with."""
    for text in overrides:
        if not text.startswith("ensemble."):
            raise ConfigError(f"override {text!r}: aggregation changes ensemble.* keys only (the jobs are trained)")


def grown_since(cfg: Config, run_dir: Path) -> Optional[str]:
    """Why this worker's aggregation must publish nothing, when the run directory's config.yaml now plans more
    jobs than `cfg` (the run grew while this worker trained: the grown plan's aggregation reports these jobs
    too, and a report of the smaller plan written after it would replace it); None when the plans agree."""
    from distrain.study.plan import expand_plan

    ours, now = {j.id for j in expand_plan(cfg)}, {j.id for j in expand_plan(load_run_dir(run_dir))}
    if ours == now:
        return None
    return (f"{run_dir} grew to {len(now)} jobs while this worker ran its plan of {len(ours)}; the grown plan's "
            f"aggregation reports them all, so this one publishes nothing")  # fmt: skip


def prepare_run_dir(cfg: Config, manifest: FoldManifest, new_run_dir: bool) -> Config:
    """Make (or reuse) the run directory of `cfg` and write its `folds.json` and `config.yaml`. A directory
    that holds another config is refused, or with `new_run_dir` the next free `<experiment>-N` is used;
    one whose config `cfg` only grows (new seeds or backbones, `growth_differences`) takes the new config,
    so the new jobs train and the study is aggregated again. Returns the config with the experiment name
    chosen. Rank 0 only."""
    from distrain.study.folds import persist_or_check

    experiment, grows = cfg.experiment, []
    for n in range(2, 1000):
        run_dir = Path(cfg.run_root) / experiment
        saved = run_dir / "config.yaml"
        # the saved config read as a Config: sections added to distrain since it was written take their defaults
        grows, refused = (
            growth_differences(load_run_dir(run_dir).to_dict(), cfg.to_dict()) if saved.exists() else ([], [])
        )
        if not refused:
            break
        if not new_run_dir:
            raise DataError(
                f"{run_dir} was run with another config ({'; '.join(refused)}); a run directory grows only by "
                f"new cv.seeds or model.names; use another experiment name, --new-run-dir, or delete it"
            )
        experiment = f"{cfg.experiment}-{n}"
    persist_or_check(manifest, run_dir / "folds.json")
    cfg = dataclasses.replace(cfg, experiment=experiment)
    if grows:
        print(f"distrain: {run_dir} grows: {'; '.join(grows)}", flush=True)
    if grows or not saved.exists():
        atomic_write_text(saved, dump_yaml(cfg))
    return cfg


def open_ledger(cfg: Config, run_dir: Path) -> Ledger:
    sc = cfg.scheduler
    return Ledger(
        run_dir, lease_timeout_s=sc.lease_timeout_s, max_retries=sc.max_retries, max_lost_leases=sc.max_lost_leases
    )


def open_tracker(cfg: Config, run_dir: Path, worker: str = "") -> Tracker:
    """The MLflow tracker of the run directory's study run (the default store sits beside run directories)."""
    from distrain.tracking.mlflow_tracker import MlflowTracker

    return MlflowTracker.from_config(cfg.tracking, run_dir, cfg.experiment, worker)


def start_tracking(cfg: Config, manifest: FoldManifest, worker: str) -> Tracker:
    """Open the tracker and record the study's fold manifest and config on its study run."""
    tracker = open_tracker(cfg, cfg.run_dir, worker)
    tracker.log_params(tracker.parent_run_id, {"fold_manifest_hash": manifest.hash})
    tracker.log_artifact(tracker.parent_run_id, cfg.run_dir / "config.yaml")
    return tracker


def job_params(cfg: Config, job: Job) -> dict:
    """What a job's MLflow run records as params: the whole config as this job's backbone sees it (its
    model.overrides applied), flattened, and the job's cell."""
    effective = cfg.for_model(job.model).to_dict()
    return {**flatten(effective), "job.model": job.model, "job.seed": job.seed, "job.fold": job.fold}


def requeue_damaged_jobs(run_dir: Path, ledger: Ledger, plan: list[Job], log: Callable[[str], None]) -> list[str]:
    """Done jobs whose files are lost or damaged (`results.job_files_problem`): their files are set aside in
    `jobs/<id>/damaged-<time>/` and the ledger makes them pending again (with the plan's aggregation), so
    they are trained again instead of trusted. Returns their ids."""
    from distrain.orchestration.ledger import aggregate_id
    from distrain.study.results import job_files_problem, set_aside_job_files

    requeued = []
    for job in plan:
        if ledger.state(job.id).status != JobStatus.DONE or (problem := job_files_problem(run_dir, job)) is None:
            continue
        aside = set_aside_job_files(run_dir, job)
        if ledger.requeue(job.id, problem):
            log(f"distrain: {job.id}: {problem}; its files are set aside in {aside} and it is trained again")
            requeued.append(job.id)
    aggregation = aggregate_id([j.id for j in plan])
    if requeued and ledger.state(aggregation).status == JobStatus.DONE:
        ledger.requeue(aggregation, f"jobs trained again: {', '.join(requeued)}")
    return requeued


def failed_jobs(ledger: Ledger, plan: list[Job]) -> list[dict]:
    """[{id, error}] of the jobs the ledger marked failed for good."""
    return [
        {"id": s.job_id, "error": s.last_error}
        for s in ledger.states([j.id for j in plan])
        if s.status == JobStatus.FAILED
    ]


def finished_report(run_dir: Path) -> Report:
    """The study's report.json, or BadInput when it has not aggregated (other workers may still train its jobs)."""
    from distrain.ensembles.report import Report

    report = Report.read(run_dir)
    if report is None:
        raise BadInput(f"{run_dir} has no report.json yet: its jobs are still training (`distrain status --run-dir "
                       f"{run_dir}`); run the command again when it has aggregated")  # fmt: skip
    return report
