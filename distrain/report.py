"""Aggregate finished jobs into `report.json` and a short table.

report.json contract (later stages add keys; these stay):
    {"experiment", "metric",
     "jobs": [{"id", "model", "seed", "fold", "status", "val_score"}],
     "cv": {"mean", "std"},
     "test": {"fold_average"},
     "mlflow": {"tracking_uri", "experiment_id", "parent_run_id"}}
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from distrain.config import Config
from distrain.engine import Job, Predictions
from distrain.fsutil import atomic_write_json
from distrain.metrics import score
from distrain.outputs import load_job_predictions, read_done


class CoverageError(RuntimeError):
    """OOF predictions do not cover the CV samples exactly once per (model, seed)."""


def check_oof_coverage(jobs: list[Job], oofs: dict[str, Predictions], cv_ids: set[str]) -> None:
    """Every CV sample has exactly one OOF prediction per (model, seed)."""
    by_model_seed: dict[tuple[str, int], list[str]] = {}
    for job in jobs:
        by_model_seed.setdefault((job.model, job.seed), []).extend(oofs[job.id].sample_ids)
    for (model, seed), ids in by_model_seed.items():
        if len(ids) != len(set(ids)) or set(ids) != cv_ids:
            raise CoverageError(f"OOF of {model} seed {seed}: {len(ids)} rows, {len(set(ids))} distinct, "
                                f"for {len(cv_ids)} CV samples")


def fold_average(tests: list[Predictions]) -> Optional[Predictions]:
    """Mean of the jobs' test probabilities (all folds, seeds and models)."""
    if not tests or any(t is None for t in tests):
        return None
    ids = tests[0].sample_ids
    if any(t.sample_ids != ids for t in tests):
        raise CoverageError("test predictions of different jobs cover different samples")
    return Predictions(ids, np.mean([t.probs for t in tests], axis=0), tests[0].labels)


def build_report(cfg: Config, jobs: list[Job], run_dir: Path, cv_ids: set[str], mlflow_info: dict,
                 check_coverage: bool = True) -> dict:
    """Read every finished job's outputs and assemble the report dict (without writing it)."""
    metric = cfg.train.metric
    rows, oofs, tests = [], {}, []
    for job in jobs:
        done = read_done(run_dir, job)
        oof, test = load_job_predictions(run_dir, job)
        oofs[job.id] = oof
        tests.append(test)
        rows.append({"id": job.id, "model": job.model, "seed": job.seed, "fold": job.fold,
                     "status": done["status"], "val_score": float(done["val_score"]),
                     "best_epoch": done["best_epoch"],
                     "test_score": test.score(metric) if test is not None else None})
    if check_coverage and not cfg.cv.only_folds:
        check_oof_coverage(jobs, oofs, cv_ids)
    scores = np.array([r["val_score"] for r in rows])
    avg = fold_average(tests)
    per_model_seed = {}
    for (model, seed) in dict.fromkeys((j.model, j.seed) for j in jobs):
        member = [t for j, t in zip(jobs, tests) if (j.model, j.seed) == (model, seed)]
        fa = fold_average(member)
        per_model_seed[f"{model}-s{seed}"] = fa.score(metric) if fa is not None else None
    return {
        "experiment": cfg.experiment, "metric": metric, "jobs": rows,
        "cv": {"mean": float(scores.mean()), "std": float(scores.std(ddof=1)) if len(scores) > 1 else 0.0},
        "test": {"fold_average": avg.score(metric) if avg is not None else None,
                 "fold_average_by_model_seed": per_model_seed,
                 "n_samples": len(avg.sample_ids) if avg is not None else 0},
        "mlflow": mlflow_info,
    }


def write_report(run_dir: Path, report: dict) -> Path:
    path = run_dir / "report.json"
    atomic_write_json(path, report)
    return path


def format_table(report: dict) -> str:
    """The short table the main job prints."""
    m = report["metric"]
    lines = [f"{'job':<32} {'val ' + m:>14} {'test ' + m:>14}"]
    for r in report["jobs"]:
        test = f"{r['test_score']:.4f}" if r.get("test_score") is not None else "-"
        lines.append(f"{r['id']:<32} {r['val_score']:>14.4f} {test:>14}")
    lines.append(f"{'CV mean ± std':<32} {report['cv']['mean']:>7.4f} ± {report['cv']['std']:.4f}")
    fa = report["test"]["fold_average"]
    if fa is not None:
        lines.append(f"{'holdout test, fold-averaged':<32} {'':>14} {fa:>14.4f}")
    if report.get("ensembles"):
        lines += ["", f"{'ensemble':<32} {'CV ' + m:>14} {'test ' + m:>14}"]
        for name, s in report["ensembles"].items():
            test = f"{s['test']:.4f}" if s["test"] is not None else "-"
            lines.append(f"{name:<32} {s['cv']:>14.4f} {test:>14}")
    return "\n".join(lines)
