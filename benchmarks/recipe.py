"""The competition recipe's options, each measured against the same baseline: the shipped digits config run
unchanged and with one option switched on (same folds, seeds and holdout), then the OOF-tuned decision
thresholds of the binary and multilabel digits configs (at 0.5 and tuned, CV and holdout). Every run is the real
main job (`python distrain/run.py`) in a scratch directory; the figures are read from each run's report.json.
Prints a table with differences to the baseline and, last, one JSON line.

    python benchmarks/recipe.py [--variants baseline,ema,mixup,focal,tta] [--tasks binary,multilabel] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {
    "baseline": [],
    "ema": ["train.ema_decay=0.98", "train.ema_warmup=true"],
    "mixup": ["augment.mixup=0.2"],
    "focal": ["train.loss=focal", "train.focal_gamma=2.0"],
    "tta": ["tta.scales=[0.875,1.125]"],  # digits are not mirror-symmetric: scales, not flips
}
QUIET = ["train.progress=false", "ensemble.register_model=false"]
TASK_CONFIGS = {"binary": "digits_binary.yaml", "multilabel": "digits_multilabel.yaml"}


def run(config: Path, experiment: str, overrides: list[str], cwd: Path) -> tuple[dict, float]:
    """One main job; returns its report.json and wall seconds."""
    start = time.perf_counter()
    cmd = [sys.executable, str(REPO / "distrain" / "run.py"), "--config", str(config), f"experiment={experiment}"]
    proc = subprocess.run(cmd + QUIET + overrides, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{experiment} failed:\n{proc.stderr[-3000:]}")
    return json.loads((cwd / "runs" / experiment / "report.json").read_text()), time.perf_counter() - start


def figures(report: dict) -> dict:
    ens = report["ensembles"]
    return {
        "cv_mean": report["cv"]["mean"],
        "holdout_fold_average": report["test"]["fold_average"],
        "soft_vote_test": ens["soft_vote"]["test"],
        "stacking_test": ens["stacking"]["test"] if "stacking" in ens else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--tasks", default=",".join(TASK_CONFIGS), help="thresholds runs: binary, multilabel or none")
    ap.add_argument("--keep", default="", help="run in this directory and keep it (default: a temporary one)")
    args = ap.parse_args()
    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown or (names and names[0] != "baseline"):
        raise SystemExit(f"--variants: start with baseline, or none; known: {', '.join(VARIANTS)} (unknown: {unknown})")
    with tempfile.TemporaryDirectory() as tmp:
        cwd = Path(args.keep or tmp)
        cwd.mkdir(parents=True, exist_ok=True)
        results = {}
        for name in names:
            report, seconds = run(REPO / "configs" / "digits.yaml", f"recipe-{name}", VARIANTS[name], cwd)
            results[name] = {**figures(report), "seconds": round(seconds, 1), "overrides": VARIANTS[name]}
            if name == "ema":
                results[name]["jobs_best_from_ema"] = sum(j.get("best_source") == "ema" for j in report["jobs"])
            print(f"{name}: {results[name]}", flush=True)
        if results:
            variants_table(results)
        tasks = {task: thresholds_run(task, cwd) for task in args.tasks.split(",") if task and task != "none"}
    print(json.dumps({"benchmark": "recipe", "variants": results, **tasks}))


def variants_table(results: dict) -> None:
    """Each variant against the baseline."""
    base = results["baseline"]
    print(f"\n{'variant':<10} {'CV mean':>9} {'holdout':>9} {'Δ holdout':>10} {'soft vote':>10} {'stacking':>9}")
    for name, r in results.items():
        delta = r["holdout_fold_average"] - base["holdout_fold_average"]
        print(f"{name:<10} {r['cv_mean']:>9.4f} {r['holdout_fold_average']:>9.4f} {delta:>+10.4f} "
              f"{r['soft_vote_test']:>10.4f} {r['stacking_test'] or float('nan'):>9.4f}")  # fmt: skip


def thresholds_run(task: str, cwd: Path) -> dict:
    """The task's digits config, run as shipped: each ensemble's thresholds and its scores at 0.5 and tuned."""
    from distrain.ensembles.report import format_threshold

    if task not in TASK_CONFIGS:
        raise SystemExit(f"--tasks: {task!r} (known: {', '.join(TASK_CONFIGS)})")
    report, seconds = run(REPO / "configs" / TASK_CONFIGS[task], f"recipe-{task}", [], cwd)
    print(f"\n{task} ({report['metric']}): ensemble (threshold): CV at 0.5 -> tuned; holdout at 0.5 -> tuned")
    for name, t in report["thresholds"].items():
        print(f"  {name} ({format_threshold(t['threshold'])}): CV {t['cv_at_0.5']:.4f} -> {t['cv_tuned']:.4f} "
              f"({t['cv_tuned'] / t['cv_at_0.5']:.3f}x); holdout {t['test_at_0.5']:.4f} -> "
              f"{t['test_tuned']:.4f} ({t['test_tuned'] / t['test_at_0.5']:.3f}x)", flush=True)  # fmt: skip
    return {"metric": report["metric"], "seconds": round(seconds, 1), "ensembles": report["ensembles"],
            "thresholds": report["thresholds"]}  # fmt: skip


if __name__ == "__main__":
    main()
