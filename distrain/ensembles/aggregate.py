"""Aggregation, the computing half: after the last job, every ensemble of the study with its report, from the
jobs' OOF and test predictions; then the files of the review (`write_ensemble_files`). Torch-free. Publishing
(report.json, MLflow, the registered model) is the caller's next step (`distrain.orchestration.aggregation`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from distrain.config import Config, member_columns
from distrain.ensembles.combine import EnsembleOutcome, run_ensembles
from distrain.ensembles.report import Report, build_report, format_threshold
from distrain.ensembles.store import JobPredictions, OOFStore, SampleTruth, build_store, long_table
from distrain.ensembles.voting import soft_vote
from distrain.errors import EnsembleError
from distrain.fsutil import atomic_write, atomic_write_text
from distrain.names import ENSEMBLE_ORDER, REGISTRABLE, Ensemble
from distrain.study.plan import column_key, expand_plan
from distrain.study.results import is_done, job_files_problem, load_job_predictions, read_done
from distrain.tasks import best_index, get_task


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
    truth: SampleTruth,
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
    fold_of_sample = truth.fold_of_sample
    if cfg.cv.only_folds:  # a deliberately partial plan: ensemble over the trained folds only
        fold_of_sample = {s: f for s, f in fold_of_sample.items() if f in set(cfg.cv.only_folds)}
    store = build_store(preds, missing, fold_of_sample, truth.labels_of_sample, allow_partial=allow_partial)
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


@dataclass
class Aggregation:
    """What aggregation computed, before anything is published: the report (without its registered model yet),
    the OOF store it was built from, every ensemble's outcome, and the run directories ensembled."""

    cfg: Config
    report: Report
    store: OOFStore
    outcome: EnsembleOutcome
    sources: list[Source]

    def registered_ensemble(self) -> Ensemble:
        """`ensemble.register` when it names a built ensemble, else the registrable one with the best CV score."""
        return registered_ensemble(self.cfg, self.outcome)

    def registered_test_probs(self) -> np.ndarray | None:
        """What the registered ensemble gives on the holdout images (None without a holdout): what the served
        model must reproduce."""
        if self.store.test is None:
            return None
        chosen, outcome = self.registered_ensemble(), self.outcome
        if chosen == Ensemble.STACKING:
            return outcome.stacking.test_probs
        return soft_vote(self.store.test, np.asarray(column_weights(chosen, self.store.columns, outcome)))

    def settings_id(self) -> str:
        return ensemble_settings_id(self.cfg, self.store.columns)

    def job_ids(self) -> list[str]:
        return planned_job_ids(self.sources)


@dataclass
class MapAggregation:
    """What a dense task's aggregation computed (`ensembles.dense`, `ensembles.masks`): the report of the maps'
    ensembles and the run directories ensembled."""

    cfg: Config
    report: Report
    sources: list[Source]

    def settings_id(self) -> str:
        return ensemble_settings_id(self.cfg, self.report.ensemble_details["columns"])

    def job_ids(self) -> list[str]:
        return planned_job_ids(self.sources)


def ensemble_settings_id(cfg: Config, columns: list[str]) -> str:
    """A short name of what the ensembles were built from besides the plan: the ensemble settings (members,
    registered ensemble, stacking's) and the columns that made it (failed or left-out jobs drop theirs). Ensemble
    runs are reused only for the same plan and settings id: MLflow keeps a run's first params."""
    settings = {"ensemble": asdict(cfg.ensemble), "columns": columns}
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]


def planned_job_ids(sources: list[Source]) -> list[str]:
    """Every planned job of the sources (prefixed), trained or not: the plan the aggregation reports."""
    return [src.prefix + j.id for src in sources for j in expand_plan(src.cfg)]


def compute_aggregation(
    cfg: Config,
    sources: list[Source],
    truth: SampleTruth,
    failed_jobs: list[dict],
    allow_partial: bool,
    mlflow_info: dict,
) -> Aggregation:
    """The report and every ensemble of the sources' finished jobs; writes nothing. `failed_jobs` ([{id, error}],
    from the ledger) are named in the report; their (model, seed) columns are left out of the ensembles (which
    needs allow_partial). Raises EnsembleError when a job is missing or its files are damaged."""
    try:
        store, test_by_job = load_store(cfg, sources, truth, allow_partial or bool(failed_jobs))
    except EnsembleError as e:
        if not failed_jobs:
            raise
        first, run_dir = failed_jobs[0]["id"], sources[0].run_dir
        raise EnsembleError(f"{e}: {len(failed_jobs)} job(s) failed for good ({first}, ...); fix the cause, then "
                            f"`distrain retry --run-dir {run_dir}` and run again") from None  # fmt: skip
    report = build_report(cfg, store, test_by_job, mlflow_info)
    report.failed_jobs = list(failed_jobs)
    if len(sources) > 1:
        report.sources = [{"run_dir": str(src.run_dir), "prefix": src.prefix} for src in sources]
    ec = cfg.ensemble
    pinned = tuple(member_columns(ec.members.pin, all_columns(sources)))
    outcome = run_ensembles(store, cfg.train.metric, ec, task=get_task(cfg.task), seed=cfg.cv.fold_seed,
                            test_by_job=test_by_job, pinned=pinned)  # fmt: skip
    report.ensembles = {name: {"cv": outcome.scores[name]["cv"], "test": outcome.scores[name]["test"]}
                        for name in ENSEMBLE_ORDER if name in outcome.scores}  # fmt: skip
    report.ensemble_details = _ensemble_details(cfg, store, outcome, sources)
    report.thresholds = outcome.thresholds or None
    return Aggregation(cfg, report, store, outcome, sources)


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


def write_ensemble_files(agg: Aggregation, out_dir: Path) -> list[Path]:
    """ensemble/: the OOF store, the stacking test probabilities and the review (plots and summary.md, returned)."""
    store, outcome = agg.store, agg.outcome
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / "oof_store.parquet", lambda f: long_table(store).to_parquet(f, index=False))
    if outcome.stacking is not None and outcome.stacking.test_probs is not None:
        atomic_write(
            out_dir / "stacking_test.npz",
            lambda f: np.savez(f, sample_ids=np.asarray(store.test_ids), probs=outcome.stacking.test_probs),
        )
    return _write_review(agg.report, store, outcome, out_dir)


def _write_review(report: Report, store: OOFStore, outcome: EnsembleOutcome, out_dir: Path) -> list[Path]:
    from distrain.ensembles.plots import plot_calibration, plot_confusion, plot_scores

    metric = report.metric
    named = [n for n in report.ensembles if n in outcome.oof_predictions]
    best_name = named[best_index(metric, [report.ensembles[n]["cv"] for n in named])]
    labels, predicted, soft = store.labels, outcome.oof_predictions[best_name], store.oof.mean(0)
    n_classes, pooled = store.num_classes, ""
    if get_task(report.task).label_sets:  # every (sample, label) decision as one binary one
        labels, predicted, soft, n_classes = labels.ravel(), predicted.ravel(), soft.reshape(-1, 1), 2
        soft, pooled = np.concatenate([1.0 - soft, soft], axis=1), ", all labels pooled"
    files = [
        plot_scores(report.jobs, report.ensembles, metric, out_dir / "scores.png"),
        plot_confusion(
            labels,
            predicted,
            n_classes,
            f"{best_name} (OOF, {metric} {report.ensembles[best_name]['cv']:.4f}{pooled})",
            out_dir / "confusion.png",
        ),
        plot_calibration(labels, soft, f"soft vote, OOF probabilities{pooled}", out_dir / "calibration.png"),
    ]
    atomic_write_text(out_dir / "summary.md", summary_markdown(report))
    return files + [out_dir / "summary.md"]


def summary_markdown(report: Report) -> str:
    """The ensembles table (and what was left out) as markdown."""
    m = report.metric
    lines = [f"# {report.experiment}: ensembles ({m})", "", f"| ensemble | CV {m} | test {m} |", "|---|---|---|"]
    for name, s in report.ensembles.items():
        test = f"{s['test']:.4f}" if s["test"] is not None else "-"
        lines.append(f"| {name} | {s['cv']:.4f} | {test} |")
    details = report.ensemble_details
    lines += [
        "",
        f"Columns (model, seed): {', '.join(details['columns'])}; best single: {details['best_single_column']}.",
        "Weighted-vote weights: " + ", ".join(f"{c} {w:.3f}" for c, w in details["weights"].items()) + ".",
    ]
    for name, t in (report.thresholds or {}).items():
        test = f"; test {t['test_at_0.5']:.4f} -> {t['test_tuned']:.4f}" if t["test_tuned"] is not None else ""
        lines.append(f"{name}: threshold {format_threshold(t['threshold'])}: CV {m} {t['cv_at_0.5']:.4f} at 0.5 -> "
                     f"{t['cv_tuned']:.4f} tuned{test}.")  # fmt: skip
    if details["left_out"]:
        lines += ["", "Left out (--allow-partial):"] + [f"- {x['column']}: {x['reason']}" for x in details["left_out"]]
    return "\n".join(lines) + "\n"


def registered_ensemble(cfg: Config, outcome: EnsembleOutcome) -> Ensemble:
    """`ensemble.register` when it names a built ensemble, else the registrable one with the best CV score."""
    built = [name for name in REGISTRABLE if name in outcome.scores]
    if cfg.ensemble.register in built:
        return Ensemble(cfg.ensemble.register)
    if cfg.ensemble.register != "best":
        raise EnsembleError(f"ensemble.register: {cfg.ensemble.register} was not built ({', '.join(built)} were)")
    return built[best_index(cfg.train.metric, [outcome.scores[name]["cv"] for name in built])]


def column_weights(name: str, columns: list[str], outcome: EnsembleOutcome) -> list[float]:
    """The weight of each column in a weighted-mean ensemble (stacking's are the weighted vote's, unused)."""
    if name == Ensemble.BEST_SINGLE:
        return [float(c == outcome.scores["best_single"]["column"]) for c in columns]
    if name == Ensemble.SOFT_VOTE:
        return [1.0 / len(columns)] * len(columns)
    weights = outcome.selection["weights"] if name == Ensemble.SELECTION else outcome.weights
    return [weights[c] for c in columns]
