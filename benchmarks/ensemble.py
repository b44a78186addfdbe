"""Voting + stacking at scale: 100k CV samples x 20 base columns x 10 classes of synthetic probabilities
(plus a 20k test split), through every ensemble distrain runs after training. Target: under 60 s on a
2-core machine. Prints the time of each stage and, last, one JSON line.

    python benchmarks/ensemble.py [--samples 100000] [--columns 20] [--classes 10]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from distrain.ensembles.combine import run_ensembles
from distrain.ensembles.store import OOFStore


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
    t0 = time.perf_counter()
    run_ensembles(store, "accuracy", stacking=False)  # voting alone, timed
    vote_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    full = run_ensembles(store, "accuracy", stacking=True)
    all_s = time.perf_counter() - t0
    stack_s = all_s - vote_s
    for name, s in full.scores.items():
        print(f"{name:<14} cv {s['cv']:.4f} test {s['test']:.4f}")
    print(
        f"voting {vote_s:.1f} s, stacking {stack_s:.1f} s (rounds per fold {full.stacking.best_iterations}), "
        f"voting + stacking {all_s:.1f} s (target < 60 s); data generation {gen_s:.1f} s"
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
                "voting_s": round(vote_s, 2),
                "stacking_s": round(stack_s, 2),
                "total_s": round(all_s, 2),
                "stacking_cv": round(full.scores["stacking"]["cv"], 4),
                "soft_vote_cv": round(full.scores["soft_vote"]["cv"], 4),
                "best_single_cv": round(full.scores["best_single"]["cv"], 4),
                "under_60s": all_s < 60,
            }
        )
    )


if __name__ == "__main__":
    main()
