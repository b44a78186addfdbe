"""Decision metrics of class indices: distrain's counts (one np.bincount confusion matrix) against scikit-learn's
functions, side by side on the same decisions (100k rows x 10 classes by default). The ensembles score these
thousands of times per study (selection: rounds x columns x (folds + 1); the best single column per fold;
binary thresholds: 99 grid points per fold and ensemble). Then the ensemble stage under f1_macro with either
scorer. Prints each metric's times and ratio, and, last, one JSON line.

    python benchmarks/metrics.py [--samples 100000] [--classes 10] [--repeats 20] [--stage-samples 20000]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from sklearn import metrics as skm

from distrain.config import EnsembleConfig
from distrain.tasks.metrics import score_labels

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks.ensemble's synthetic store

SKLEARN = {
    "accuracy": skm.accuracy_score,
    "balanced_accuracy": skm.balanced_accuracy_score,
    "f1_macro": lambda y, p: skm.f1_score(y, p, average="macro", zero_division=0),
    "f1_micro": lambda y, p: skm.f1_score(y, p, average="micro", zero_division=0),
    "qwk": lambda y, p: skm.cohen_kappa_score(y, p, weights="quadratic"),
}


def timed(fn, repeats: int) -> tuple[float, float]:
    """(seconds per call, the value) over `repeats` calls."""
    t0 = time.perf_counter()
    for _ in range(repeats):
        value = fn()
    return (time.perf_counter() - t0) / repeats, value


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--samples", type=int, default=100_000)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--stage-samples", type=int, default=20_000, help="rows of the f1_macro ensemble stage")
    args = p.parse_args()
    rng = np.random.default_rng(0)
    labels = rng.integers(0, args.classes, args.samples)
    pred = np.where(rng.random(args.samples) < 0.8, labels, rng.integers(0, args.classes, args.samples))
    rows = {}
    for metric, reference in SKLEARN.items():
        ours_s, ours = timed(lambda metric=metric: score_labels(metric, labels, pred), args.repeats)
        theirs_s, theirs = timed(lambda reference=reference: reference(labels, pred), args.repeats)
        assert abs(ours - theirs) < 1e-12, (metric, ours, theirs)
        rows[metric] = {"counts_ms": round(ours_s * 1e3, 3), "sklearn_ms": round(theirs_s * 1e3, 3),
                        "speedup": round(theirs_s / ours_s, 1)}  # fmt: skip
        print(f"{metric:<18} counts {ours_s * 1e3:7.2f} ms  scikit-learn {theirs_s * 1e3:7.2f} ms  "
              f"x{theirs_s / ours_s:.1f}  (equal: {ours:.6f})")  # fmt: skip
    stage = ensemble_stage(args.stage_samples)
    print(f"ensembles under f1_macro ({args.stage_samples} x 20 columns x 10 classes, stacking off): counts "
          f"{stage['counts_s']:.1f} s, scikit-learn {stage['sklearn_s']:.1f} s, x{stage['speedup']:.1f}")  # fmt: skip
    print(json.dumps({"benchmark": "metrics", "samples": args.samples, "classes": args.classes,
                      "cpus": os.cpu_count(), "metrics": rows, "ensembles_f1_macro": stage}))  # fmt: skip


def ensemble_stage(samples: int) -> dict:
    """Voting, the best single column per fold and selection (25 rounds) of benchmarks/ensemble.py's synthetic
    store scored by f1_macro, with distrain's counts and with scikit-learn's functions in their place."""
    from benchmarks.ensemble import synthetic_store
    from distrain.ensembles.combine import run_ensembles
    from distrain.tasks import get_task, metrics

    store, _ = synthetic_store(samples, 20, 10, samples // 5)
    counts = metrics._single_label_score
    out = {}
    for name, impl in (("counts", counts), ("sklearn", lambda metric, y, p: float(SKLEARN[metric](y, p)))):
        metrics._single_label_score = impl
        t0 = time.perf_counter()
        scores = run_ensembles(store, "f1_macro", EnsembleConfig(stacking=False), task=get_task("multiclass")).scores
        out[f"{name}_s"] = round(time.perf_counter() - t0, 2)
        out[f"{name}_selection_cv"] = round(scores["selection"]["cv"], 6)
    metrics._single_label_score = counts
    assert out["counts_selection_cv"] == out["sklearn_selection_cv"]
    return {**out, "speedup": round(out["sklearn_s"] / out["counts_s"], 1)}


if __name__ == "__main__":
    main()
