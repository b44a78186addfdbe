"""The distillation report: teacher ensemble, its best single column, the distilled student and the hard-label
student side by side, each with its CV score, holdout score and serving cost on this machine."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from distrain.config import Config
from distrain.data.index import read_index
from distrain.orchestration import phases
from distrain.serving.cost import serving_cost
from distrain.serving.predictor import EnsemblePredictor, shard_chunks
from distrain.study.plan import Job
from distrain.study.results import job_dir, load_predictions
from distrain.tasks import get_task

COST_SAMPLES = 512
"""Samples timed for the serving cost (the holdout's first, else the CV pool's)."""


def cost_samples(cfg: Config) -> list:
    index = read_index(cfg.data.root, cfg.data.num_classes, cfg.task)
    return next(shard_chunks(index.urls("test") or index.urls("cv"), COST_SAMPLES))[1]


def whole_pool_test(cfg: Config, job: Job) -> Optional[float]:
    """The holdout score of a whole-pool job's network at the task's default rule, as report.json scores the
    ensembles beside it (None without a holdout)."""
    path = job_dir(cfg.run_dir, job) / "test.npz"
    if not path.is_file():
        return None
    pred = load_predictions(path)
    return get_task(cfg.task).score(cfg.train.metric, pred.labels, pred.probs)


def distill_rows(teacher: Config, run_dir: Path, configs: list[Config], served: list[Job], ensemble: str) -> list[dict]:
    """One row per model: name, what it is, CV, holdout, holdout of the fold-averaged students, serving cost."""
    from distrain.serving.artifacts import write_single_model_artifacts

    samples = cost_samples(teacher)
    report = phases.finished_report(run_dir)
    predictor = EnsemblePredictor(run_dir / "ensemble" / "model")
    best = report.ensemble_details["best_single_column"]
    rows = [
        {"name": "teacher", "what": f"{ensemble} of {len(predictor.meta['columns'])} columns"
         + (" (soft targets: its weighted vote)" if predictor.boosters else ""),
         "cv": report.ensembles[ensemble]["cv"], "test": report.ensembles[ensemble]["test"],
         **serving_cost(predictor, samples)},
        {"name": "best_single", "what": f"column {best} (fold models averaged)",
         "cv": report.ensembles["best_single"]["cv"], "test": report.ensembles["best_single"]["test"],
         **serving_cost(predictor.only_column(best), samples)},
    ]  # fmt: skip
    for cfg, job, name in zip(configs, served, ("student", "student_hard")):
        student = phases.finished_report(cfg.run_dir)
        index = read_index(cfg.data.root, cfg.data.num_classes, cfg.task)
        threshold = (student.thresholds or {}).get("best_single", {}).get("threshold")
        dest = cfg.run_dir / "student" / "model"
        if not (dest / "meta.json").is_file():
            write_single_model_artifacts(cfg, job, cfg.run_dir, dest, index.classes, index.channels, threshold)
        what = "soft OOF targets" if name == "student" else "hard labels only"
        rows.append({"name": name, "what": f"{job.model} on {what}, one network (whole CV pool)",
                     "cv": student.ensembles["best_single"]["cv"], "test": whole_pool_test(cfg, job),
                     "test_fold_average": student.ensembles["best_single"]["test"],
                     **serving_cost(EnsemblePredictor(dest), samples)})  # fmt: skip
    return rows


def format_rows(rows: list[dict], metric: str) -> str:
    """The printed table."""

    def num(x: Optional[float]) -> str:
        return "-" if x is None else f"{x:.4f}"

    lines = [f"{'model':<14}{'CV ' + metric:>16}{'holdout':>10}{'samples/s':>11}{'networks':>10}{'params':>11}  what"]
    for r in rows:
        lines.append(f"{r['name']:<14}{num(r['cv']):>16}{num(r['test']):>10}{r['samples_per_s']:>11.0f}"
                     f"{r['networks']:>10}{r['parameters']:>11,}  {r['what']}")  # fmt: skip
    return "\n".join(lines)


def log_rows(cfg: Config, rows: list[dict], report_path: Path) -> None:
    """Every row's figures as metrics (`distill_<name>_<figure>`) and distill.json on the student study's run."""
    tracker = phases.open_tracker(cfg, cfg.run_dir)
    run_id = phases.finished_report(cfg.run_dir).mlflow["parent_run_id"]
    metrics = {f"distill_{r['name']}_{k}": float(r[k]) for r in rows for k in ("cv", "test", "samples_per_s")
               if r.get(k) is not None}  # fmt: skip
    tracker.log_metrics(run_id, metrics, step=0)
    tracker.log_artifact(run_id, report_path)
