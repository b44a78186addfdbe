"""`report.json` as a typed object, read and written in one place, and the short table printed from it.

report.json contract (later stages add keys; these stay):
    {"experiment", "task", "metric",
     "jobs": [{"id", "model", "seed", "fold", "status", "val_score", "best_epoch", "best_source", "test_score"}],
     "cv": {"mean", "std"},
     "test": {"fold_average", "fold_average_by_model_seed", "n_samples"},
     "mlflow": {"tracking_uri", "experiment_id", "parent_run_id"},
     "failed_jobs": [{"id", "error"}], "sources" (combined run directories only),
     "ensembles": {name: {"cv", "test"}}, "ensemble_details", "thresholds" (tasks that tune them),
     "ensemble_model": {"name", "version", "uri", "ensemble"} (once registered)}
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from distrain.config import Config
from distrain.ensembles.store import OOFStore
from distrain.fsutil import atomic_write_json
from distrain.names import JobStatus
from distrain.tasks import get_task


@dataclass
class Report:
    """report.json. Keys whose value is None (`sources`, `thresholds`, `ensemble_model`) are left out of the file,
    as they always were; everything else is written in this order."""

    experiment: str
    task: str
    metric: str
    jobs: list[dict]
    cv: dict
    test: dict
    mlflow: dict
    failed_jobs: list[dict] = field(default_factory=list)
    sources: Optional[list[dict]] = None
    ensembles: dict[str, dict] = field(default_factory=dict)
    ensemble_details: dict = field(default_factory=dict)
    thresholds: Optional[dict] = None
    ensemble_model: Optional[dict] = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Report:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})

    def write(self, run_dir: Path) -> Path:
        """Write `<run_dir>/report.json` atomically; returns its path."""
        path = run_dir / "report.json"
        atomic_write_json(path, self.to_dict())
        return path

    @classmethod
    def read(cls, run_dir: Path) -> Optional[Report]:
        """The run directory's report.json, or None when there is none (or it cannot be read)."""
        try:
            return cls.from_dict(json.loads((run_dir / "report.json").read_text()))
        except (FileNotFoundError, json.JSONDecodeError):
            return None


def build_report(cfg: Config, store: OOFStore, test_by_job: Optional[np.ndarray], mlflow_info: dict) -> Report:
    """Assemble the report (without writing it) from the OOF store of the finished jobs.

    test_by_job [J, n_test, C] holds each job's own test probabilities, in the order of store.jobs.
    """
    metric, score = cfg.train.metric, get_task(cfg.task).score
    labels = store.test_labels
    has_test = test_by_job is not None and labels is not None
    rows = [
        {
            "id": j["id"],
            "model": j["model"],
            "seed": j["seed"],
            "fold": j["fold"],
            "status": JobStatus.DONE,
            "val_score": float(j["val_score"]),
            "best_epoch": j["best_epoch"],
            "best_source": j.get("best_source", "raw"),  # raw weights or their EMA (train.ema_decay)
            "test_score": score(metric, labels, test_by_job[i]) if has_test else None,
        }
        for i, j in enumerate(store.jobs)
    ]
    scores = np.array([r["val_score"] for r in rows])
    return Report(
        experiment=cfg.experiment,
        task=cfg.task,
        metric=metric,
        jobs=rows,
        cv={"mean": float(scores.mean()), "std": float(scores.std(ddof=1)) if len(scores) > 1 else 0.0},
        test={
            "fold_average": score(metric, labels, test_by_job.mean(0)) if has_test else None,
            "fold_average_by_model_seed": {
                c: score(metric, labels, store.test[k]) if has_test else None for k, c in enumerate(store.columns)
            },
            "n_samples": len(store.test_ids),
        },
        mlflow=mlflow_info,
    )


def format_table(report: Report) -> str:
    """The short table the main job prints."""
    m = report.metric
    lines = [f"{'job':<32} {'val ' + m:>14} {'test ' + m:>14}"]
    for r in report.jobs:
        test = f"{r['test_score']:.4f}" if r.get("test_score") is not None else "-"
        lines.append(f"{r['id']:<32} {r['val_score']:>14.4f} {test:>14}")
    for f in report.failed_jobs:
        lines.append(f"{f['id']:<32} {'FAILED':>14} {'-':>14}")
    lines.append(f"{'CV mean ± std':<32} {report.cv['mean']:>7.4f} ± {report.cv['std']:.4f}")
    fa = report.test["fold_average"]
    if fa is not None:
        lines.append(f"{'holdout test, fold-averaged':<32} {'':>14} {fa:>14.4f}")
    if report.ensembles:
        lines += ["", f"{'ensemble':<32} {'CV ' + m:>14} {'test ' + m:>14}"]
        for name, s in report.ensembles.items():
            cv, test = (f"{s[k]:.4f}" if s[k] is not None else "-" for k in ("cv", "test"))
            lines.append(f"{name:<32} {cv:>14} {test:>14}")
        for name, why in report.ensemble_details.get("skipped", {}).items():
            lines.append(f"{name:<32} {'skipped: ' + why}")
    lines += _postprocess_lines(report.ensemble_details.get("postprocess"))
    if report.thresholds:
        named = {f"{name} ({format_threshold(t['threshold'])})": t for name, t in report.thresholds.items()}
        width = max(32, *map(len, named))
        lines += ["", f"{'threshold tuned on OOF':<{width}} {'CV at 0.5 / tuned':>22} {'test at 0.5 / tuned':>22}"]
        for label, t in named.items():
            test = f"{t['test_at_0.5']:.4f} / {t['test_tuned']:.4f}" if t["test_tuned"] is not None else "-"
            lines.append(f"{label:<{width}} {t['cv_at_0.5']:>10.4f} / {t['cv_tuned']:.4f} {test:>22}")
    return "\n".join(lines)


def _postprocess_lines(postprocess: dict | None) -> list[str]:
    """A dense task's post-processing tuned on OOF: CV at the default settings and tuned (fold-honest)."""
    if not postprocess:
        return []
    header = f"{'post-processing tuned on OOF':<32} {'CV default':>14} {'CV tuned':>14}"
    lines = ["", header + "  final thresh / box / unclip"]
    for name, t in postprocess.items():
        f = t["final"]
        lines.append(f"{name:<32} {t['cv_default']:>14.4f} {t['cv_tuned']:>14.4f}  "
                     f"{f['thresh']:.2f} / {f['box_thresh']:.2f} / {f['unclip_ratio']:.1f}")  # fmt: skip
    return lines


def format_threshold(threshold: float | list[float]) -> str:
    """A threshold on p(positive) as `0.42`; per-label thresholds as `0.42/0.50/0.31` (up to 4, else the range)."""
    if not isinstance(threshold, list):
        return f"{threshold:.2f}"
    if len(threshold) <= 4:
        return "/".join(f"{t:.2f}" for t in threshold)
    return f"{len(threshold)} labels, {min(threshold):.2f}-{max(threshold):.2f}"
