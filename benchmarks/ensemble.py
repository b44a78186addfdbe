"""Voting + selection + stacking at scale: 100k CV samples x 20 base columns x 10 classes of synthetic
probabilities (plus a 20k test split), through every ensemble distrain runs after training. Target: all of it
under 30 s on a 2-core machine. Times voting alone, voting + selection, and everything (voting + selection +
stacking) in one run; prints each ensemble's CV and holdout score, the stages' times and CV ratios, and, last,
one JSON line.

    python benchmarks/ensemble.py [--samples 100000] [--columns 20] [--classes 10]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from distrain.config import EnsembleConfig
from distrain.ensembles.combine import run_ensembles
from distrain.ensembles.store import OOFStore
from distrain.tasks import get_task


def synthetic_store(n: int, columns: int, classes: int, n_test: int, seed: int = 0) -> tuple[OOFStore, float]:
    """Columns of varying quality: each leans towards the true class by a column-specific margin."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    test_labels = rng.integers(0, classes, n_test)
    strength = rng.uniform(0.2, 0.9, columns).astype(np.float32)
    t0 = time.perf_counter()

    def probs(y):
        out = rng.standard_normal((columns, len(y), classes), dtype=np.float32)
        out[:, np.arange(len(y)), y] += strength[:, None]
        out -= out.max(-1, keepdims=True)
        np.exp(out, out=out)
        out /= out.sum(-1, keepdims=True)
        return out

    store = OOFStore(
        sample_ids=[f"s{i:06d}" for i in range(n)],
        labels=labels,
        folds=np.arange(n) % 5,
        columns=[f"m{k}-s{k}" for k in range(columns)],
        oof=probs(labels),
        test_ids=[f"t{i:06d}" for i in range(n_test)],
        test_labels=test_labels,
        test=probs(test_labels),
        jobs=[{"id": f"m{k}-s{k}-f{f}", "val_score": 0.0} for k in range(columns) for f in range(5)],
    )
    return store, time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--samples", type=int, default=100_000)
    p.add_argument("--columns", type=int, default=20)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--test", type=int, default=20_000)
    args = p.parse_args()
    store, gen_s = synthetic_store(args.samples, args.columns, args.classes, args.test)
    timed = {}
    for stage, kwargs in {
        "voting": dict(stacking=False, selection_rounds=0),
        "voting_selection": dict(stacking=False),
        "total": dict(stacking=True),
    }.items():
        t0 = time.perf_counter()
        full = run_ensembles(store, "accuracy", EnsembleConfig(**kwargs), task=get_task("multiclass"))
        timed[stage] = time.perf_counter() - t0
    cv = {name: s["cv"] for name, s in full.scores.items()}
    for name, s in full.scores.items():
        print(f"{name:<14} cv {s['cv']:.4f} test {s['test']:.4f}")
    selection_s, stacking_s = timed["voting_selection"] - timed["voting"], timed["total"] - timed["voting_selection"]
    print(
        f"voting {timed['voting']:.1f} s, selection {selection_s:.1f} s, stacking {stacking_s:.1f} s "
        f"(rounds per fold {full.stacking.best_iterations}); all {timed['total']:.1f} s (target < 30 s); "
        f"data generation {gen_s:.1f} s"
    )
    print(
        f"CV vs soft vote: stacking x{cv['stacking'] / cv['soft_vote']:.3f}, "
        f"selection x{cv['selection'] / cv['soft_vote']:.3f}, "
        f"weighted vote x{cv['weighted_vote'] / cv['soft_vote']:.3f}"
    )
    print(
        json.dumps(
            {
                "benchmark": "ensemble",
                "samples": args.samples,
                "columns": args.columns,
                "classes": args.classes,
                "test_samples": args.test,
                "cpus": os.cpu_count(),
                "voting_s": round(timed["voting"], 2),
                "selection_s": round(selection_s, 2),
                "stacking_s": round(stacking_s, 2),
                "total_s": round(timed["total"], 2),
                **{f"{name}_cv": round(cv[name], 4) for name in ("stacking", "selection", "soft_vote", "best_single")},
                **{
                    f"{name}_test": round(full.scores[name]["test"], 4)
                    for name in ("stacking", "selection", "soft_vote")
                },
                "selection_weights": {c: round(w, 3) for c, w in full.selection["weights"].items() if w},
                "under_30s": timed["total"] < 30,
            }
        )
    )


if __name__ == "__main__":
    main()
