"""Aggregation as the study runs it: compute (the ensembles and the report, `ensembles.aggregate`), then publish
(the review files and report.json, the MLflow review, the registered model), then close the study's runs and
print the table. Called by the worker that finishes last (`experiment`) and by `distrain aggregate`.

Every write is preceded by `Guards.fence` (it raises when this aggregation lost its claim: a stale aggregator
publishes nothing) and the computing half ends at `Guards.stop_point` (SIGTERM stops there; once publishing has
begun it runs to its end).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from distrain.config import Config
from distrain.ensembles.aggregate import Aggregation, MapAggregation, Source, compute_aggregation, write_ensemble_files
from distrain.ensembles.report import Report, format_table
from distrain.ensembles.store import SampleTruth
from distrain.errors import Preempted
from distrain.fsutil import atomic_write_json, atomic_write_text
from distrain.names import VOTES, Ensemble
from distrain.study.plan import plan_id
from distrain.tasks import get_task
from distrain.tracking.base import Tracker


def _no_op() -> None:
    return None


@dataclass(frozen=True)
class Guards:
    """What may stop an aggregation: `fence` raises when its claim is lost (called before every write),
    `stop_point` raises on SIGTERM (called once, between computing and publishing)."""

    fence: Callable[[], None] = field(default=_no_op)
    stop_point: Callable[[], None] = field(default=_no_op)


def aggregate_study(
    cfg: Config,
    run_dir: Path,
    tracker: Tracker,
    truth: SampleTruth,
    failed: list[dict],
    *,
    sources: Optional[list[Source]] = None,
    allow_partial: bool = False,
    guards: Guards = Guards(),
) -> Report:
    """Compute the ensembles of the study's finished jobs, publish them, end the study run, print the table and
    what failed, and send tracking buffered while MLflow was down if it is back. Returns the report. `sources`:
    the run directories ensembled, when they are others than `run_dir` (`combined.combine_run_dirs`); `failed`:
    the jobs failed for good ([{id, error}]), left out of the ensembles."""
    sources = sources or [Source(run_dir, cfg)]
    mlflow_info = {"tracking_uri": tracker.tracking_uri, "experiment_id": tracker.experiment_id,
                   "parent_run_id": tracker.parent_run_id}  # fmt: skip
    if get_task(cfg.task).dense:
        agg = _compute_dense(cfg, sources, truth, failed, allow_partial or bool(failed), mlflow_info)
        guards.stop_point()
        publish_dense(agg, run_dir, tracker, guards.fence)
    else:
        agg = compute_aggregation(cfg, sources, truth, failed, allow_partial or bool(failed), mlflow_info)
        guards.stop_point()
        publish(agg, run_dir, tracker, guards.fence)
    guards.fence()
    ended = {j["id"]: "FINISHED" for j in agg.report.jobs} | {f["id"]: "FAILED" for f in failed}
    tracker.close_job_runs(ended)
    tracker.end_run(tracker.parent_run_id)
    _print_summary(agg.report, run_dir)
    sync_if_back(tracker, run_dir)
    return agg.report


def publish(agg: Aggregation, run_dir: Path, tracker: Tracker, fence: Callable[[], None]) -> None:
    """The review files and report.json, the MLflow review (study metrics, artifacts, one run per ensemble stage)
    and, when `ensemble.register_model` is on and the tracker can, the registered model (whichever ensemble it
    is: registration does not depend on stacking)."""
    fence()
    review = write_ensemble_files(agg, run_dir / "ensemble")
    fence()
    report_path = agg.report.write(run_dir)
    fence()
    stages = log_review(tracker, agg, review, report_path)
    if agg.cfg.ensemble.register_model and tracker.can_register_models:
        from distrain.serving.register import register_ensemble  # late: torch and timm, only to write a model

        stage = stages.get(Ensemble.STACKING) or stages["voting"]
        agg.report.ensemble_model = register_ensemble(agg, tracker, run_dir, stage, fence)
        fence()
        agg.report.write(run_dir)
        tracker.log_artifact(tracker.parent_run_id, report_path)
    for run_id in stages.values():
        tracker.end_run(run_id)


def _compute_dense(cfg: Config, sources: list[Source], truth: SampleTruth, failed: list[dict], allow_partial: bool,
                   mlflow_info: dict) -> MapAggregation:  # fmt: skip
    """A dense study's aggregation: of boxes (text regions) or of masks."""
    if get_task(cfg.task).annotation == "json":
        from distrain.ensembles.dense import compute_dense_aggregation  # late: OpenCV, shapely, pyclipper

        return compute_dense_aggregation(cfg, sources, truth, failed, allow_partial, mlflow_info)
    from distrain.ensembles.masks import compute_mask_aggregation

    return compute_mask_aggregation(cfg, sources, truth, failed, allow_partial, mlflow_info)


def publish_dense(agg: MapAggregation, run_dir: Path, tracker: Tracker,
                  fence: Callable[[], None]) -> None:  # fmt: skip
    """A dense task's review: the summary, report.json, the study run's metrics and one run for the ensembles;
    for text detection also the tuned post-processing (ensemble/postprocess.json), the worst OOF images drawn, and
    the voting fold models' files (ensemble/model/), registered as an MLflow model when `ensemble.register_model`
    is on."""
    from distrain.ensembles.dense import DenseAggregation, draw_worst_images
    from distrain.ensembles.report import format_table

    out, detection = run_dir / "ensemble", isinstance(agg, DenseAggregation)
    out.mkdir(parents=True, exist_ok=True)
    fence()
    atomic_write_text(out / "summary.md", f"# {agg.cfg.experiment}\n\n```\n{format_table(agg.report)}\n```\n")
    review = [out / "summary.md"]
    if detection:
        atomic_write_json(out / "postprocess.json", agg.postprocess)
        review += [out / "postprocess.json", *draw_worst_images(agg, out)]
    fence()
    report_path = agg.report.write(run_dir)
    fence()
    parent = tracker.parent_run_id
    tracker.log_metrics(parent, _summary_metrics(agg.report), step=len(agg.report.jobs))
    for f in review:
        tracker.log_artifact(parent, f, "review")
    tracker.log_artifact(parent, report_path)
    plan = {"distrain.plan": plan_id(agg.job_ids()), "distrain.ensemble": agg.settings_id()}
    ec = agg.cfg.ensemble
    stage = tracker.child_run("voting", {"ensemble.vote_fraction": ec.vote_fraction, "ensemble.box_iou": ec.box_iou},
                              plan)  # fmt: skip
    tracker.log_metrics(stage, _stage_metrics(agg.report, tuple(agg.report.ensembles)), step=0)
    _dense_model(agg, run_dir, tracker, stage, fence, detection)
    tracker.end_run(stage)


def _dense_model(agg: MapAggregation, run_dir: Path, tracker: Tracker, stage: str,
                 fence: Callable[[], None], detection: bool) -> None:  # fmt: skip
    """The served ensemble's files (ensemble/model/, which `distrain predict` loads): the voting fold models of a
    detection study, a segmentation study's best-on-CV map ensemble; registered when asked."""
    from distrain.serving import detection as boxes  # late: torch, timm
    from distrain.serving import masks
    from distrain.serving.dense import register_dense_model

    fence()
    cfg, report, dest = agg.cfg, agg.report, run_dir / "ensemble" / "model"
    if detection:
        model_dir, pyfunc, name = boxes.write_detection_model(run_dir, cfg, report, dest), boxes.PYFUNC, "fold_vote"
    else:
        model_dir, pyfunc = masks.write_mask_model(run_dir, cfg, report, dest), masks.PYFUNC
        name = masks.served_ensemble(report)  # the best on CV of best_single and mean_of_maps
    if cfg.ensemble.register_model and tracker.can_register_models:
        fence()
        report.ensemble_model = register_dense_model(cfg, report, tracker, model_dir, stage, pyfunc, name)
        fence()
        tracker.log_artifact(tracker.parent_run_id, report.write(run_dir))


def log_review(tracker: Tracker, agg: Aggregation, review_files: list[Path], report_path: Path) -> dict[str, str]:
    """The study run's summary metrics (one point per aggregation: a grown study adds one) and review artifacts,
    and a run per ensemble stage (voting; stacking when built) with its settings and scores. Returns the stage
    runs' ids by stage name, still open."""
    parent, report, ec = tracker.parent_run_id, agg.report, agg.cfg.ensemble
    tracker.log_metrics(parent, _summary_metrics(report), step=len(report.jobs))
    for f in review_files:
        tracker.log_artifact(parent, f, "review")
    tracker.log_artifact(parent, report_path)
    plan = {"distrain.plan": plan_id(agg.job_ids()), "distrain.ensemble": agg.settings_id()}  # else new runs
    voting_params = {"ensemble.vote_fraction": ec.vote_fraction, "ensemble.vote_threshold": ec.vote_threshold,
                     **{f"weight.{c}": round(w, 6) for c, w in agg.outcome.weights.items()}}  # fmt: skip
    stages = {"voting": tracker.child_run("voting", voting_params, plan)}
    tracker.log_metrics(stages["voting"], _stage_metrics(report, VOTES), step=0)
    if agg.outcome.stacking is not None:
        keys = ("learning_rate", "num_leaves", "max_rounds", "early_stopping", "max_meta_rows")
        stacking = tracker.child_run("stacking", {f"ensemble.{k}": getattr(ec, k) for k in keys}, plan)
        tracker.log_metrics(stacking, _stage_metrics(report, (Ensemble.STACKING,)), step=0)
        stages[Ensemble.STACKING] = stacking
    return stages


def _summary_metrics(report: Report) -> dict[str, float]:
    """The study run's metrics: the CV mean and spread, the fold average's holdout score, each ensemble's."""
    metric = report.metric
    summary = {f"cv_{metric}_mean": report.cv["mean"], f"cv_{metric}_std": report.cv["std"]}
    if report.test["fold_average"] is not None:
        summary[f"test_{metric}_fold_average"] = report.test["fold_average"]
    for name, s in report.ensembles.items():
        for split in ("cv", "test"):
            if s[split] is not None:
                summary[f"{name}_{split}"] = s[split]
    return summary


def _stage_metrics(report: Report, names: tuple[str, ...]) -> dict[str, float]:
    """`<ensemble>_cv` / `<ensemble>_test` of the named ensembles that were built (and have a holdout)."""
    return {
        f"{n}_{split}": report.ensembles[n][split]
        for n in names
        if n in report.ensembles
        for split in ("cv", "test")
        if report.ensembles[n][split] is not None
    }


def _print_summary(report: Report, run_dir: Path) -> None:
    print(format_table(report))
    print(f"distrain: report: {run_dir / 'report.json'}")
    if report.ensemble_details["left_out"]:
        print("left out: " + "; ".join(x["reason"] for x in report.ensemble_details["left_out"]))
    if report.failed_jobs:
        failed = report.failed_jobs
        print(f"distrain: {len(failed)} job(s) failed: " + "; ".join(f"{f['id']}: {f['error']}" for f in failed))


def sync_if_back(tracker: Tracker, run_dir: Path) -> Optional[int]:
    """After an offline run: replay the buffered calls if the server answers now (else say how to later).
    Returns the number of calls synced, None when there was nothing to do or it is still down."""
    from distrain.tracking.buffer import pending_calls, sync_buffers

    if not tracker.offline or not pending_calls(run_dir):
        return None
    try:
        tracker.go_online()
        result = sync_buffers(tracker, wait=False)
    except Preempted as e:  # SIGTERM after the aggregation: what is synced stays synced
        print(f"distrain: {e}", file=sys.stderr)
        return None
    except Exception as e:  # still unreachable: keep the buffer for `distrain sync`
        print(
            f"distrain: tracking still unreachable ({type(e).__name__}); run "
            f"`distrain sync --run-dir {run_dir}` when it is back",
            file=sys.stderr,
        )
        return None
    if result is None:
        print(f"distrain: another sync of {run_dir} is running; it sends the buffered tracking calls")
        return None
    print(f"distrain: synced {result['synced']} buffered tracking calls")
    return result["synced"]
