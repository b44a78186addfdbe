"""The main job: `accelerate launch distrain/run.py --config configs/digits.yaml [a.b=value ...]`.

One launch is one *worker*: it claims jobs (models x seeds x folds) from the run directory's ledger
and trains each as one DDP process group over all launched processes, until none is left. Start as
many workers as you like, on one node (`distrain schedule`) or many (Kubernetes); the one that
finishes last writes `runs/<experiment>/report.json` with the ensembles and prints a table.
Also reachable as `distrain train`. The phases live in `distrain.orchestration.experiment`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __name__ == "__main__" and __package__ in (None, ""):
    # Run as a file (accelerate launch distrain/run.py): the script's own folder must not shadow
    # top-level packages, and the repository root must be importable even without `pip install`.
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    sys.path.insert(0, str(here.parent))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="distrain train", description=__doc__.split("\n")[0])
    p.add_argument("--config", default=None, help="experiment YAML (default: all built-in defaults)")
    p.add_argument(
        "--shard",
        default=None,
        help="static mode: train only jobs i, i+n, ... of the plan (i/n); default: $JOB_COMPLETION_INDEX "
        "with $DISTRAIN_NUM_SHARDS if set, else dynamic claiming",
    )
    p.add_argument(
        "--new-run-dir",
        action="store_true",
        help="if the run directory holds another config, use <experiment>-2, -3, ... instead of refusing",
    )
    # The `deepspeed` launcher appends --local_rank=N; LOCAL_RANK in the environment says the same.
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="a.b=value overrides, e.g. train.epochs=3 cv.seeds=[1,2]")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code: 0 all done, 1 a job or the aggregation failed,
    2 bad input, 75 stopped by SIGTERM with its state saved (see distrain.errors)."""
    from distrain import interrupts

    interrupts.install()  # before the heavy imports: SIGTERM from here on is one line and exit 75
    try:
        return _run(parse_args(argv))
    except interrupts.Terminated:
        return interrupts.exit_stopped()
    finally:
        interrupts.disarm()


def _run(args: argparse.Namespace) -> int:
    from distrain.config import load_config
    from distrain.errors import BadInput, refuse, storage_error
    from distrain.orchestration.worker import parse_shard

    try:
        cfg = load_config(args.config, args.overrides)
        shard = parse_shard(args.shard)
        from distrain.distributed.runtime import exit_without_teardown
        from distrain.orchestration.experiment import run_experiment

        return exit_without_teardown(run_experiment(cfg, shard=shard, new_run_dir=args.new_run_dir))
    except BadInput as e:
        return refuse(e)
    except OSError as e:  # disk full or read-only where a library wrote (distrain's own writes say so themselves)
        if storage_error(e) is None:
            raise
        return refuse(storage_error(e))


if __name__ == "__main__":
    sys.exit(main())
