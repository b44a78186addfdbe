"""After the last job: report.json, the ensembles, review plots, MLflow runs and the registered model.

Called by the main job when every job is done, and by `distrain ensemble --run-dir ...` on its own.
Everything is written into `<run_dir>/ensemble/` and `<run_dir>/report.json` atomically.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from distrain.config import Config, member_columns
from distrain.ensembles.combine import EnsembleOutcome, run_ensembles
from distrain.ensembles.report import build_report, format_threshold, model_entry, write_report
from distrain.ensembles.store import JobPredictions, OOFStore, build_store, long_table
from distrain.ensembles.voting import soft_vote
from distrain.errors import EnsembleError
from distrain.fsutil import atomic_write, atomic_write_text
from distrain.study.plan import column_key, expand_plan, plan_id
from distrain.study.results import is_done, job_files_problem, load_job_predictions, read_done
from distrain.tasks import best_index

if TYPE_CHECKING:
    from distrain.tracking.base import Tracker

PYFUNC_MODEL = "distrain.tracking.mlflow_model:DistrainPyfunc"  # the registered model's class, by import path

ENSEMBLE_ORDER = (
    "best_single",
    "mean_single",
    "fold_average",
    "soft_vote",
    "hard_vote",
    "weighted_vote",
    "selection",
    "k_of_n_vote",
    "stacking",
)


@dataclass(frozen=True)
class Source:
    """A run directory whose finished jobs feed the ensembles. When run directories are combined and share a
    (model, seed) column, `prefix` (`<run dir name>/`) goes before its column, backbone and job names."""

    run_dir: Path
    cfg: Config
    prefix: str = ""

    def columns(self) -> list[str]:
        """Its plan's (model, seed) columns, prefixed, in plan order."""
        return [self.prefix + column_key(m, s) for m in self.cfg.model.names for s in self.cfg.cv.seeds]


def all_columns(sources: list[Source]) -> list[str]:
    return [c for src in sources for c in src.columns()]


def load_store(
    cfg: Config,
    sources: list[Source],
    fold_of_sample: dict[str, int],
    labels_of_sample: dict[str, int],
    allow_partial: bool,
) -> tuple[OOFStore, np.ndarray | None]:
    """The OOF store of the sources' finished jobs, plus each job's own test probabilities [J, n_test, C]."""
    preds, missing = [], []
    excluded = set(member_columns(cfg.ensemble.members.exclude, all_columns(sources)))
    for k, src in enumerate(sources):
        for job in expand_plan(src.cfg):
            model, job_id = src.prefix + job.model, src.prefix + job.id
            if column_key(model, job.seed) in excluded:
                continue  # left out of every ensemble by hand (ensemble.members.exclude)
            if not is_done(src.run_dir, job):
                missing.append({"id": job_id, "model": model, "seed": job.seed})
                continue
            problem = job_files_problem(src.run_dir, job, hashed=("oof.npz", "test.npz"))
            if problem is not None:
                raise EnsembleError(f"job {job_id}: {problem}; run the main command on {src.run_dir} to train it again")
            preds.append(_job_predictions(src.run_dir, job, model, job_id, k))
    if cfg.cv.only_folds:  # a deliberately partial plan: ensemble over the trained folds only
        fold_of_sample = {s: f for s, f in fold_of_sample.items() if f in set(cfg.cv.only_folds)}
    store = build_store(preds, missing, fold_of_sample, labels_of_sample, allow_partial=allow_partial)
    test_by_job = None
    if store.test is not None:
        by_id = {p.id: p for p in preds}
        test_by_job = np.stack([by_id[j["id"]].test_probs for j in store.jobs])  # aligned with store.jobs
    return store, test_by_job


def _job_predictions(run_dir: Path, job, model: str, job_id: str, source: int) -> JobPredictions:
    """A finished job's predictions under the (possibly prefixed) names it has in the store."""
    oof, test = load_job_predictions(run_dir, job)
    done = read_done(run_dir, job)
    return JobPredictions(
        id=job_id,
        model=model,
        seed=job.seed,
        fold=job.fold,
        val_score=float(done["val_score"]),
        best_epoch=int(done["best_epoch"]),
        best_source=done.get("best_source", "raw"),
        oof_ids=oof.sample_ids,
        oof_probs=oof.probs,
        test_ids=test.sample_ids if test else [],
        test_probs=test.probs if test else None,
        test_labels=test.labels if test else None,
        source=source,
    )


def aggregate(
    cfg: Config,
    run_dir: Path,
    tracker: Tracker,
    fold_of_sample: dict[str, int],
    labels_of_sample: dict[str, int],
    allow_partial: bool = False,
    failed_jobs: list[dict] | None = None,
    sources: list[Source] | None = None,
    fence: Callable[[], None] = lambda: None,
    stop_point: Callable[[], None] = lambda: None,
) -> dict:
    """Build and write report.json with ensembles into `run_dir`; log the review to MLflow. Returns the report.
    `failed_jobs` ([{id, error}], from the ledger) are named in the report; their (model, seed)
    columns are left out of the ensembles (which needs allow_partial). `sources`: the run directories whose
    jobs are ensembled (default: `run_dir` itself, with `cfg`). `fence` is called before every write and
    raises when this aggregation lost its claim (a stale aggregator must publish nothing). `stop_point` is called
    once the ensembles are computed, before anything is published: it raises to stop there (SIGTERM); after it,
    publishing (files, then MLflow) runs to its end."""
    metric = cfg.train.metric
    sources = sources or [Source(run_dir, cfg)]
    try:
        store, test_by_job = load_store(cfg, sources, fold_of_sample, labels_of_sample, allow_partial)
    except EnsembleError as e:
        if not failed_jobs:
            raise
        raise EnsembleError(f"{e}: {len(failed_jobs)} job(s) failed for good ({failed_jobs[0]['id']}, ...); fix the "
                            f"cause, then `distrain retry --run-dir {run_dir}` and run again") from None  # fmt: skip
    mlflow_info = {
        "tracking_uri": tracker.tracking_uri,
        "experiment_id": tracker.experiment_id,
        "parent_run_id": tracker.parent_run_id,
    }
    report = build_report(cfg, store, test_by_job, mlflow_info)
    report["failed_jobs"] = list(failed_jobs or [])
    if len(sources) > 1:
        report["sources"] = [{"run_dir": str(src.run_dir), "prefix": src.prefix} for src in sources]
    ec = cfg.ensemble
    outcome = run_ensembles(
        store,
        metric,
        test_by_job=test_by_job,
        vote_fraction=ec.vote_fraction,
        vote_threshold=ec.vote_threshold,
        stacking=ec.stacking,
        seed=cfg.cv.fold_seed,
        learning_rate=ec.learning_rate,
        num_leaves=ec.num_leaves,
        max_rounds=ec.max_rounds,
        early_stopping=ec.early_stopping,
        max_meta_rows=ec.max_meta_rows,
        task=cfg.task,
        selection_rounds=ec.selection_rounds,
        pinned=tuple(member_columns(ec.members.pin, all_columns(sources))),
    )
    report["ensembles"] = {
        name: {"cv": outcome.scores[name]["cv"], "test": outcome.scores[name]["test"]}
        for name in ENSEMBLE_ORDER
        if name in outcome.scores
    }
    report["ensemble_details"] = _ensemble_details(cfg, store, outcome, sources)
    if outcome.thresholds:
        report["thresholds"] = outcome.thresholds
    out_dir = run_dir / "ensemble"
    stop_point()
    fence()
    review = _write_ensemble_files(report, store, outcome, out_dir, metric)
    fence()
    path = write_report(run_dir, report)
    _log_to_mlflow(cfg, tracker, report, outcome, store, run_dir, sources, review, path, fence)
    return report


def _ensemble_details(cfg: Config, store: OOFStore, outcome: EnsembleOutcome, sources: list[Source]) -> dict:
    """What report.json says about how the ensembles were built: columns, weights, votes, stacking, selection."""
    ec = cfg.ensemble
    return {
        "best_single_column": outcome.scores["best_single"]["column"],
        "best_single_fold_columns": outcome.scores["best_single"]["fold_columns"],  # whose OOF rows its CV scores
        "columns": store.columns,
        "base": outcome.base,
        "weights": outcome.weights,
        "k_of_n": {
            "k": outcome.vote_k,
            "n_oof": outcome.vote_n_oof,
            "n_test": outcome.vote_n_test,
            "threshold": ec.vote_threshold,
        },
        "stacking_best_iterations": outcome.stacking.best_iterations if outcome.stacking else None,
        **({"selection": outcome.selection} if outcome.selection else {}),
        "left_out": store.left_out,
        "excluded": member_columns(ec.members.exclude, all_columns(sources)),
        "skipped": outcome.skipped,
    }


def _write_ensemble_files(
    report: dict, store: OOFStore, outcome: EnsembleOutcome, out_dir: Path, metric: str
) -> list[Path]:
    """ensemble/: the OOF store, the stacking test probabilities and the review plots (returned)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / "oof_store.parquet", lambda f: long_table(store).to_parquet(f, index=False))
    if outcome.stacking is not None and outcome.stacking.test_probs is not None:
        atomic_write(
            out_dir / "stacking_test.npz",
            lambda f: np.savez(f, sample_ids=np.asarray(store.test_ids), probs=outcome.stacking.test_probs),
        )
    return _write_review(report, store, outcome, out_dir, metric)


def _write_review(report: dict, store: OOFStore, outcome: EnsembleOutcome, out_dir: Path, metric: str) -> list[Path]:
    from distrain.ensembles.plots import plot_calibration, plot_confusion, plot_scores

    named = [n for n in report["ensembles"] if n in outcome.oof_predictions]
    best_name = named[best_index(metric, [report["ensembles"][n]["cv"] for n in named])]
    labels, predicted, soft = store.labels, outcome.oof_predictions[best_name], store.oof.mean(0)
    n_classes, pooled = store.num_classes, ""
    if labels.ndim == 2:  # multilabel: every (sample, label) decision as one binary one
        labels, predicted, soft, n_classes = labels.ravel(), predicted.ravel(), soft.reshape(-1, 1), 2
        soft, pooled = np.concatenate([1.0 - soft, soft], axis=1), ", all labels pooled"
    files = [
        plot_scores(report["jobs"], report["ensembles"], metric, out_dir / "scores.png"),
        plot_confusion(
            labels,
            predicted,
            n_classes,
            f"{best_name} (OOF, {metric} {report['ensembles'][best_name]['cv']:.4f}{pooled})",
            out_dir / "confusion.png",
        ),
        plot_calibration(labels, soft, f"soft vote, OOF probabilities{pooled}", out_dir / "calibration.png"),
    ]
    atomic_write_text(out_dir / "summary.md", summary_markdown(report))
    return files + [out_dir / "summary.md"]


def summary_markdown(report: dict) -> str:
    """The ensembles table (and what was left out) as markdown."""
    m = report["metric"]
    lines = [f"# {report['experiment']}: ensembles ({m})", "", f"| ensemble | CV {m} | test {m} |", "|---|---|---|"]
    for name, s in report["ensembles"].items():
        test = f"{s['test']:.4f}" if s["test"] is not None else "-"
        lines.append(f"| {name} | {s['cv']:.4f} | {test} |")
    details = report["ensemble_details"]
    lines += [
        "",
        f"Columns (model, seed): {', '.join(details['columns'])}; best single: {details['best_single_column']}.",
        "Weighted-vote weights: " + ", ".join(f"{c} {w:.3f}" for c, w in details["weights"].items()) + ".",
    ]
    for name, t in report.get("thresholds", {}).items():
        test = f"; test {t['test_at_0.5']:.4f} -> {t['test_tuned']:.4f}" if t["test_tuned"] is not None else ""
        lines.append(f"{name}: threshold {format_threshold(t['threshold'])}: CV {m} {t['cv_at_0.5']:.4f} at 0.5 -> "
                     f"{t['cv_tuned']:.4f} tuned{test}.")  # fmt: skip
    if details["left_out"]:
        lines += ["", "Left out (--allow-partial):"] + [f"- {x['column']}: {x['reason']}" for x in details["left_out"]]
    return "\n".join(lines) + "\n"


REGISTRABLE = ("best_single", "soft_vote", "weighted_vote", "selection", "stacking")
"""The ensembles the registered model can be: those that give probabilities from the columns' probabilities."""


def registered_ensemble(cfg: Config, outcome: EnsembleOutcome) -> str:
    """`ensemble.register` when it names a built ensemble, else the registrable one with the best CV score."""
    built = [name for name in REGISTRABLE if name in outcome.scores]
    if cfg.ensemble.register in built:
        return cfg.ensemble.register
    if cfg.ensemble.register != "best":
        raise EnsembleError(f"ensemble.register: {cfg.ensemble.register} was not built ({', '.join(built)} were)")
    return built[best_index(cfg.train.metric, [outcome.scores[name]["cv"] for name in built])]


def column_weights(name: str, columns: list[str], outcome: EnsembleOutcome) -> list[float]:
    """The weight of each column in a weighted-mean ensemble (stacking's are the weighted vote's, unused)."""
    if name == "best_single":
        return [float(c == outcome.scores["best_single"]["column"]) for c in columns]
    if name == "soft_vote":
        return [1.0 / len(columns)] * len(columns)
    weights = outcome.selection["weights"] if name == "selection" else outcome.weights
    return [weights[c] for c in columns]


def write_model_artifacts(
    cfg: Config, sources: list[Source], store: OOFStore, outcome: EnsembleOutcome, dest: Path, channels: int,
    classes: list[str] | None = None,
) -> Path:  # fmt: skip
    """The files EnsemblePredictor loads: checkpoints, meta-learner, meta.json. Each job's checkpoint and
    preprocessing come from its own run directory and config (`store.jobs[i]["source"]`)."""
    from distrain.data.transforms import resolve_transform  # late: torch, and only when a model is written

    if dest.exists():
        shutil.rmtree(dest)
    (dest / "checkpoints").mkdir(parents=True)
    jobs = []
    for j in store.jobs:
        src = sources[j["source"]]
        model, job_id = j["model"][len(src.prefix) :], j["id"][len(src.prefix) :]  # the names it was trained under
        checkpoint = f"{j['id']}.pt"  # a prefixed job: checkpoints/<run dir name>/<job>.pt
        (dest / "checkpoints" / checkpoint).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src.run_dir / "jobs" / job_id / "best.pt", dest / "checkpoints" / checkpoint)
        trained = src.cfg.for_model(model)
        jobs.append(
            {
                "id": j["id"],
                "model": model,
                "column": column_key(j["model"], j["seed"]),
                "checkpoint": checkpoint,
                "transform": resolve_transform(model, trained.data, channels).to_dict(),
                "tta": asdict(trained.tta),
            }
        )
    name = registered_ensemble(cfg, outcome)
    method = "stacking" if name == "stacking" else "weighted_vote"  # every other choice is a weighted mean
    boosters = []  # kept whichever ensemble is registered: meta.json's method says whether they are used
    if outcome.stacking is not None:
        for k, text in enumerate(outcome.stacking.booster_texts):
            (dest / f"booster_{k}.txt").write_text(text)
            boosters.append(f"booster_{k}.txt")
    (dest / "meta.json").write_text(
        json.dumps(
            {
                "columns": store.columns,
                "jobs": jobs,
                "image_size": cfg.data.image_size,
                "channels": channels,
                "num_classes": store.num_classes,
                "task": cfg.task,
                "ensemble": name,
                "method": method,
                "boosters": boosters,
                "weights": column_weights(name, store.columns, outcome),
                # binary: the decision threshold on p(positive), multilabel: one per label; tuned on the ensemble's OOF
                "threshold": outcome.thresholds[name]["threshold"] if name in outcome.thresholds else None,
                "classes": classes or [str(c) for c in range(store.num_classes)],
            }
        )
    )
    return dest


def _settings_id(cfg: Config, store: OOFStore) -> str:
    """A short name of what the ensembles were built from besides the plan: the ensemble settings (members,
    registered ensemble, stacking's) and the columns that made it (failed or left-out jobs drop theirs). Ensemble
    runs are reused only for the same plan and settings id: MLflow keeps a run's first params."""
    settings = json.dumps({"ensemble": asdict(cfg.ensemble), "columns": store.columns}, sort_keys=True, default=str)
    return hashlib.sha256(settings.encode()).hexdigest()[:12]


def _log_to_mlflow(cfg, tracker, report, outcome, store, run_dir, sources, review_files, report_path, fence) -> None:
    fence()
    parent = tracker.parent_run_id
    metric = cfg.train.metric
    summary = {f"cv_{metric}_mean": report["cv"]["mean"], f"cv_{metric}_std": report["cv"]["std"]}
    if report["test"]["fold_average"] is not None:
        summary[f"test_{metric}_fold_average"] = report["test"]["fold_average"]
    for name, s in report["ensembles"].items():
        summary[f"{name}_cv"] = s["cv"]
        if s["test"] is not None:
            summary[f"{name}_test"] = s["test"]
    tracker.log_metrics(parent, summary, step=len(report["jobs"]))  # a grown study: one more point per metric
    for f in review_files:
        tracker.log_artifact(parent, f, "review")
    tracker.log_artifact(parent, report_path)

    job_ids = [src.prefix + j.id for src in sources for j in expand_plan(src.cfg)]
    plan = {"distrain.plan": plan_id(job_ids), "distrain.ensemble": _settings_id(cfg, store)}  # else new runs
    voting = tracker.child_run(
        "voting",
        {
            "ensemble.vote_fraction": cfg.ensemble.vote_fraction,
            "ensemble.vote_threshold": cfg.ensemble.vote_threshold,
            **{f"weight.{c}": round(w, 6) for c, w in outcome.weights.items()},
        },
        plan,
    )
    tracker.log_metrics(
        voting,
        {
            f"{n}_{split}": report["ensembles"][n][split]
            for n in ("soft_vote", "hard_vote", "weighted_vote", "k_of_n_vote")
            if n in report["ensembles"]
            for split in ("cv", "test")
            if report["ensembles"][n][split] is not None
        },
        step=0,
    )
    tracker.end_run(voting)
    if outcome.stacking is None:
        return
    stacking = tracker.child_run(
        "stacking",
        {
            f"ensemble.{k}": getattr(cfg.ensemble, k)
            for k in ("learning_rate", "num_leaves", "max_rounds", "early_stopping", "max_meta_rows")
        },
        plan,
    )
    tracker.log_metrics(
        stacking,
        {
            f"stacking_{split}": report["ensembles"]["stacking"][split]
            for split in ("cv", "test")
            if report["ensembles"]["stacking"][split] is not None
        },
        step=0,
    )
    if cfg.ensemble.register_model and tracker.can_register_models:
        from distrain.data.index import read_index

        index = read_index(cfg.data.root)
        artifacts = write_model_artifacts(cfg, sources, store, outcome, run_dir / "ensemble" / "model",
                                          index.channels, index.classes)  # fmt: skip
        name = cfg.ensemble.model_name or f"distrain-{cfg.experiment}"
        fence()
        chosen = registered_ensemble(cfg, outcome)
        version = tracker.log_ensemble_model(stacking, artifacts, name, PYFUNC_MODEL, {
            "distrain.ensemble": chosen, f"cv_{cfg.train.metric}": str(outcome.scores[chosen]["cv"])})  # fmt: skip
        report["ensemble_model"] = {**model_entry(name, version), "ensemble": chosen}
        if store.test is not None:  # what the registered model must give on the holdout images
            probs = outcome.stacking.test_probs if chosen == "stacking" else soft_vote(
                store.test, np.asarray(column_weights(chosen, store.columns, outcome)))  # fmt: skip
            atomic_write(run_dir / "ensemble" / "model_test.npz",
                         lambda f: np.savez(f, sample_ids=np.asarray(store.test_ids), probs=probs))  # fmt: skip
        fence()
        write_report(run_dir, report)
        tracker.log_artifact(parent, run_dir / "report.json")
    tracker.end_run(stacking)
