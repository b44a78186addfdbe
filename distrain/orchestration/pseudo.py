"""`distrain pseudo-label`: a second round of a finished study that also trains on unlabelled images, labelled by
the study's own fold models.

    labels   each fold's ensemble (the registered ensemble's weights over every column's fold-m model) labels the
             images of data.unlabelled (`<round run dir>/pseudo_labels.npz`, `study.pseudo_labels`)
    round    a derived study `<experiment>-pseudo` (beside the first, the same plan and folds): fold m's jobs train on
             fold m's training samples plus the unlabelled images fold m's ensemble gave a class with
             pseudo.threshold (and pseudo.min_votes of its columns), as that class or, with pseudo.soft, as
             fold m's ensemble's probability row; they validate on fold m alone, so the round's CV
             is scored on the same labelled samples as the first round's, and no fold-m label reaches them
    report   every ensemble's CV and holdout in both rounds and the gain; the pseudo-labelled images per fold (and,
             where data.unlabelled is a packed data set whose labels were hidden, the pseudo-labels' accuracy):
             `<round run dir>/pseudo.json`, printed, and on the round's MLflow run

The round is an ordinary run directory: `--prepare` writes its config and stops, to train it with any launcher.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from distrain.config import Config, apply_overrides, config_from_dict, dump_yaml
from distrain.console import route_library_output
from distrain.data.index import read_index
from distrain.data.unlabelled import check_unlabelled, unlabelled_urls
from distrain.errors import BadInput
from distrain.fsutil import atomic_write_json, atomic_write_text
from distrain.orchestration import phases
from distrain.orchestration.combined import SOURCES
from distrain.orchestration.distill import registered_name, share_fold_manifest
from distrain.study.pseudo_labels import PseudoLabels, read_pseudo_labels, write_pseudo_labels

PSEUDO_LABELS = "pseudo_labels.npz"


@dataclass(frozen=True)
class PseudoRequest:
    """What `distrain pseudo-label` was asked for."""

    run_dir: Path
    unlabelled: str = ""
    """The unlabelled shards; empty: the study's data.unlabelled."""
    threshold: float = 0.9
    min_votes: int = 0
    soft: bool = False
    prepare_only: bool = False
    overrides: tuple[str, ...] = ()


def round_config(first: Config, req: PseudoRequest, unlabelled: Path, labels: Path) -> Config:
    """The first round's config as the pseudo-label round's: the same plan, data.unlabelled and pseudo.* set."""
    if req.min_votes < 0:
        raise BadInput(f"pseudo-label: --min-votes {req.min_votes}: a count of columns, >= 0")
    raw = first.to_dict()
    raw["experiment"], raw["run_root"] = f"{first.experiment}-pseudo", str(req.run_dir.parent)
    raw["data"]["unlabelled"] = str(unlabelled.resolve())
    raw["pseudo"] = {
        "labels": str(labels.resolve()),
        "threshold": req.threshold,
        "min_votes": req.min_votes,
        "soft": req.soft,
    }
    raw["ensemble"]["model_name"] = ""  # registered as distrain-<experiment>-pseudo
    return config_from_dict(apply_overrides(raw, list(req.overrides)))


def prepare(req: PseudoRequest) -> tuple[Config, Config, PseudoLabels]:
    """The first round's config, the round's, and the pseudo-labels, written into the round's run directory (kept
    when it has them: a rerun resumes on the same labels) with the first round's fold manifest (a round split
    otherwise is refused). Everything is checked, in one line, before anything is written."""
    from distrain.serving.predictor import EnsemblePredictor
    from distrain.serving.teacher import fold_ensemble_rows

    if (req.run_dir / SOURCES).is_file():
        raise BadInput(f"pseudo-label: {req.run_dir} ensembles other run directories; give one study's run directory")
    first = phases.load_run_dir(req.run_dir)
    unlabelled = Path(req.unlabelled or first.data.unlabelled or ".")
    if str(unlabelled) == ".":
        raise BadInput("pseudo-label: give --unlabelled DIR (or set data.unlabelled in the study's config)")
    registered_name(req.run_dir)
    ids = check_unlabelled(unlabelled, read_index(first.data.root, first.data.num_classes, first.task))
    cfg = round_config(first, req, unlabelled, Path(PSEUDO_LABELS))  # refuses a task without one class per sample
    path = (cfg.run_dir / PSEUDO_LABELS).resolve()
    cfg = dataclasses.replace(cfg, pseudo=dataclasses.replace(cfg.pseudo, labels=str(path)))
    if path.is_file():
        labels = read_pseudo_labels(path, set(ids), first.data.num_classes, first.cv.folds)
    else:
        predictor = EnsemblePredictor(req.run_dir / "ensemble" / "model")
        rows = fold_ensemble_rows(predictor, unlabelled_urls(unlabelled), first.cv.folds)
        labels = PseudoLabels(rows.sample_ids, rows.probs, rows.votes, rows.columns)
    if req.min_votes > labels.columns:
        raise BadInput(f"pseudo-label: --min-votes {req.min_votes}: the ensemble has {labels.columns} weighted columns")
    share_fold_manifest(req.run_dir, cfg.run_dir)
    write_pseudo_labels(path, labels)
    atomic_write_text(cfg.run_dir / "pseudo.yaml", dump_yaml(cfg))
    return first, cfg, labels


def run_pseudo(req: PseudoRequest) -> int:
    """Pseudo-labels, the round, the report. Returns the exit code."""
    from distrain.orchestration.experiment import run_experiment

    route_library_output(req.run_dir)
    first, cfg, labels = prepare(req)
    print(f"distrain: pseudo-label round config: {cfg.run_dir / 'pseudo.yaml'}", flush=True)
    if req.prepare_only:
        return 0
    code = run_experiment(cfg)
    if code != 0:
        return code
    report = pseudo_report(first, req.run_dir, cfg, labels)
    out = cfg.run_dir / "pseudo.json"
    atomic_write_json(out, report)
    print(format_report(report), flush=True)
    tracker = phases.open_tracker(cfg, cfg.run_dir)
    run_id = phases.finished_report(cfg.run_dir).mlflow["parent_run_id"]
    gains = {f"pseudo_gain_{r['ensemble']}_{k}": r[f"{k}_gain"] for r in report["ensembles"] for k in ("cv", "test")
             if r[f"{k}_gain"] is not None}  # fmt: skip
    tracker.log_metrics(run_id, gains, step=0)
    tracker.log_artifact(run_id, out)
    print(f"distrain: pseudo-label report: {out}", flush=True)
    return 0


def pseudo_report(first: Config, run_dir: Path, cfg: Config, labels: PseudoLabels) -> dict:
    """Both rounds' ensembles side by side, and what each fold took from the unlabelled images."""
    before, after = phases.finished_report(run_dir), phases.finished_report(cfg.run_dir)
    rows = []
    for name, now in after.ensembles.items():
        was = before.ensembles.get(name)
        if was is None:
            continue
        gain = {k: None if now[k] is None or was[k] is None else now[k] - was[k] for k in ("cv", "test")}
        rows.append({"ensemble": name, "cv_before": was["cv"], "cv_after": now["cv"], "cv_gain": gain["cv"],
                     "test_before": was["test"], "test_after": now["test"], "test_gain": gain["test"]})  # fmt: skip
    truth = hidden_labels(Path(cfg.data.unlabelled), read_index(first.data.root).classes)
    folds = []
    for fold in range(cfg.cv.folds):
        chosen = labels.selected(fold, cfg.pseudo.threshold, cfg.pseudo.min_votes)
        right = [truth[s] == c for s, c in chosen.items() if s in truth]
        folds.append({"fold": fold, "pseudo_labelled": len(chosen), "of": len(labels.sample_ids),
                      "accuracy": float(np.mean(right)) if right else None})  # fmt: skip
    return {"first_round": str(run_dir), "metric": cfg.train.metric, "threshold": cfg.pseudo.threshold,
            "min_votes": cfg.pseudo.min_votes, "soft": cfg.pseudo.soft, "ensembles": rows, "folds": folds}  # fmt: skip


def hidden_labels(unlabelled: Path, first_classes: list[str]) -> dict[str, int]:
    """sample id -> label, where data.unlabelled is a packed data set whose labels were hidden from the round (for
    the report only); empty otherwise."""
    if not (unlabelled / "index.json").is_file():
        return {}
    try:
        index = read_index(unlabelled)
    except BadInput:
        return {}
    if index.label_sets or index.classes != first_classes:
        return {}  # other class names (or their order): its labels are not the study's
    return dict(zip(index.sample_ids, index.labels))


def format_report(report: dict) -> str:
    """The printed table."""

    def num(x: Optional[float], sign: str = "") -> str:
        return "-" if x is None else f"{x:{sign}.4f}"

    m = report["metric"]
    lines = [f"{'ensemble':<16}{'CV ' + m:>16}{'-> pseudo':>11}{'gain':>9}{'holdout':>10}{'-> pseudo':>11}{'gain':>9}"]
    for r in report["ensembles"]:
        lines.append(f"{r['ensemble']:<16}{num(r['cv_before']):>16}{num(r['cv_after']):>11}{num(r['cv_gain'], '+'):>9}"
                     f"{num(r['test_before']):>10}{num(r['test_after']):>11}{num(r['test_gain'], '+'):>9}")  # fmt: skip
    for f in report["folds"]:
        acc = "" if f["accuracy"] is None else f", {f['accuracy']:.4f} of them right (hidden labels)"
        lines.append(f"fold {f['fold']}: {f['pseudo_labelled']} of {f['of']} unlabelled images pseudo-labelled{acc}")
    return "\n".join(lines)
