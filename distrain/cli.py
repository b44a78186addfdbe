"""`distrain` console script: wiring only.

    distrain data digits [--out DIR]               scikit-learn's digits as WebDataset shards
    distrain data pack (--images DIR | --csv FILE) --out DIR
    distrain train --config FILE [a.b=value ...]   the main job (same as distrain/run.py)
    distrain ensemble --run-dir DIR [--allow-partial]   voting + stacking again, without training
    distrain status --run-dir DIR [--json]         which jobs of a run directory are done
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EXIT_BAD_INPUT = 2


def _data(args) -> int:
    from distrain.data import samples_from_csv, samples_from_folder, write_dataset, write_digits

    if args.what == "digits":
        index = write_digits(args.out, test_fraction=args.test_fraction, shard_size=args.shard_size)
    else:
        if bool(args.images) == bool(args.csv):
            raise _bad("data pack: give exactly one of --images DIR or --csv FILE")
        samples, classes = samples_from_folder(args.images) if args.images else samples_from_csv(args.csv)
        if not samples:
            raise _bad("data pack: no images found")
        index = write_dataset(samples, args.out, classes=classes, channels=args.channels,
                              test_fraction=args.test_fraction, shard_size=args.shard_size)
    print(f"distrain: wrote {len(index.split_ids('cv'))} CV + {len(index.split_ids('test'))} test samples, "
          f"{len(index.classes)} classes, {len(index.cv_shards)}+{len(index.test_shards)} shards to {index.root}")
    return 0


def _status(args) -> int:
    from distrain.config import yaml_load

    from distrain.config import config_from_dict
    from distrain.engine import expand_plan
    from distrain.outputs import is_done, read_done

    run_dir = Path(args.run_dir)
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        raise _bad(f"{run_dir}: not a distrain run directory (no config.yaml)")
    cfg = config_from_dict(yaml_load(saved.read_text()))
    rows = []
    for job in expand_plan(cfg):
        if is_done(run_dir, job):
            d = read_done(run_dir, job)
            rows.append({"id": job.id, "status": "done", "val_score": d["val_score"]})
        else:
            rows.append({"id": job.id, "status": "pending", "val_score": None})
    if args.json:
        print(json.dumps({"run_dir": str(run_dir), "jobs": rows,
                          "report": (run_dir / "report.json").is_file()}))
    else:
        for r in rows:
            score = f"{r['val_score']:.4f}" if r["val_score"] is not None else ""
            print(f"{r['id']:<32} {r['status']:<8} {score}")
        done = sum(r["status"] == "done" for r in rows)
        print(f"{done}/{len(rows)} done; report.json {'written' if (run_dir / 'report.json').is_file() else 'not yet'}")
    return 0


def _ensemble(args) -> int:
    from distrain.aggregate import aggregate
    from distrain.config import config_from_dict, yaml_load
    from distrain.data import read_index
    from distrain.folds import FoldManifest
    from distrain.report import format_table
    from distrain.tracking import create_tracker, resolve_tracking_uri

    run_dir = Path(args.run_dir)
    saved = run_dir / "config.yaml"
    if not saved.is_file() or not (run_dir / "folds.json").is_file():
        raise _bad(f"{run_dir}: not a distrain run directory (no config.yaml / folds.json)")
    cfg = config_from_dict(yaml_load(saved.read_text()))
    index = read_index(cfg.data.root, num_classes=cfg.data.num_classes)
    manifest = FoldManifest.from_json((run_dir / "folds.json").read_text())
    tracker = create_tracker(True, resolve_tracking_uri(cfg.tracking.uri, run_dir.parent),
                             cfg.tracking.experiment_name or cfg.experiment, run_dir, run_dir.parent)
    report = aggregate(cfg, run_dir, tracker, manifest.fold_of_sample,
                       dict(zip(index.sample_ids, index.labels)), allow_partial=args.allow_partial)
    tracker.end_run(tracker.parent_run_id)
    print(format_table(report))
    if report["ensemble_details"]["left_out"]:
        print("left out: " + "; ".join(x["reason"] for x in report["ensemble_details"]["left_out"]))
    return 0


class _BadInput(Exception):
    pass


def _bad(message: str) -> _BadInput:
    return _BadInput(message)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="distrain", description="K-fold x seed x backbone training, ensembled, in MLflow")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("data", help="write WebDataset shards")
    d.add_argument("what", choices=["digits", "pack"])
    d.add_argument("--out", default="data/digits", help="output directory (must not exist)")
    d.add_argument("--images", help="pack: folder with one subfolder per class")
    d.add_argument("--csv", help="pack: CSV with columns path,label[,group]")
    d.add_argument("--channels", type=int, choices=[1, 3], default=3, help="pack: 1 (grayscale) or 3 (RGB)")
    d.add_argument("--test-fraction", type=float, default=0.2, help="fixed stratified holdout kept out of CV")
    d.add_argument("--shard-size", type=int, default=64, help="samples per tar shard")

    t = sub.add_parser("train", help="run the main job (as distrain/run.py)")
    t.add_argument("args", nargs=argparse.REMAINDER)

    e = sub.add_parser("ensemble", help="re-run voting + stacking on a run directory, without training")
    e.add_argument("--run-dir", required=True)
    e.add_argument("--allow-partial", action="store_true",
                   help="leave out (model, seed) columns with missing OOF rows instead of failing")

    s = sub.add_parser("status", help="show the jobs of a run directory")
    s.add_argument("--run-dir", required=True)
    s.add_argument("--json", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:
        from distrain.run import main as run_main
        return run_main(argv[1:])
    args = build_parser().parse_args(argv)
    from distrain.config import ConfigError
    from distrain.data import DataError
    from distrain.ensemble import EnsembleError
    from distrain.folds import FoldManifestMismatch

    try:
        return {"data": _data, "status": _status, "ensemble": _ensemble}[args.command](args)
    except (_BadInput, ConfigError, DataError, EnsembleError, FoldManifestMismatch) as e:
        print(f"distrain: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
