"""`distrain sweep`: Optuna trials trained by the same workers and ledger as a study's jobs.

A sweep of N trials is a run directory `<run_root>/<experiment>-sweep/` whose ledger holds N trial slots
(`trial-0000` ...) instead of (model, seed, fold) jobs. Any number of workers (`distrain sweep` processes, on
any node, or Kubernetes pods) claim slots as they claim jobs; a claimed slot asks the Optuna study (RDB storage:
SQLite in the run directory, or PostgreSQL for several nodes) for a trial, trains the config with the trial's
values on the folds in `sweep.folds`, reports each epoch's validation score to the pruner, and tells the study
the mean score. A slot whose worker vanished (SIGKILL, node loss) is claimed again after its lease expires;
its trial is then marked FAIL, never left RUNNING, and a new trial takes the slot. The worker that settles the
last slot writes `sweep.json` (every trial) and `best.yaml` (the config with the best trial's values).

MLflow: the sweep run directory's study run is the sweep run; each trial is a nested run with its values as
params and its per-epoch metrics.
"""

from __future__ import annotations

import dataclasses
import json
import re
import threading
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from distrain import interrupts
from distrain.config import Config, ConfigError, dump_yaml
from distrain.distributed import runtime
from distrain.errors import Interrupted, LeaseLost, Preempted
from distrain.fsutil import atomic_write_json, atomic_write_text
from distrain.names import JobStatus
from distrain.orchestration.experiment import Study, claim_and_run, start_study
from distrain.orchestration.ledger import Claim, Heartbeat, JobState
from distrain.orchestration.worker import WorkerOutcome, WorkerSteps
from distrain.study.plan import Job
from distrain.study.space import Param, apply_values, suggest
from distrain.tasks import METRICS

if TYPE_CHECKING:
    import optuna

SUFFIX = "-sweep"


class _Pruned(Exception):
    """The pruner stopped this trial (raised on every rank from the epoch hook)."""


def slot_ids(trials: int) -> list[str]:
    return [f"trial-{n:04d}" for n in range(trials)]


def sweep_run_dir(cfg: Config) -> Path:
    return Path(cfg.run_root) / f"{cfg.experiment}{SUFFIX}"


def run_sweep(cfg: Config, space: list[Param], trials: int) -> int:
    """One sweep worker: claim trial slots from the sweep's ledger and train them until none is left; the worker
    that settles the last slot writes sweep.json and best.yaml. Returns the exit code (`distrain.errors`)."""
    if len(cfg.model.names) != 1:
        raise ConfigError(f"model.names: a sweep tunes one backbone, got {cfg.model.names}; set model.names=[<one>]")
    interrupts.install()  # SIGTERM during start-up: `Terminated` (the caller exits 75); nothing is claimed yet
    tracking = dataclasses.replace(cfg.tracking, experiment_name=cfg.tracking.experiment_name or cfg.experiment)
    sweep_cfg = dataclasses.replace(cfg, experiment=cfg.experiment + SUFFIX, tracking=tracking)
    study = start_study(sweep_cfg, False, None, interrupts.STOP)  # the sweep run sits beside the study's in MLflow
    with interrupts.deferred():  # from the first claim on, SIGTERM is honoured at step boundaries (exit 75)
        opened: list[optuna.Study] = []
        study.ranks.primary(lambda: opened.append(open_optuna_study(study.cfg, study.run_dir)))
        runner = TrialRunner(study, opened[0] if opened else None, space, study.stop)
        finish = lambda states, claim: study.ranks.primary(
            lambda: finish_sweep(study, runner.optuna_study, cfg, states)
        )
        outcome = claim_and_run(study, slot_ids(trials), WorkerSteps(runner.run, finish))
        _finish_worker(study, outcome)
    return outcome.exit_code


def open_optuna_study(cfg: Config, run_dir: Path) -> optuna.Study:
    """The sweep's Optuna study in its RDB storage (created by the first worker, loaded by the others)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own lines say what each trial did
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    sc = cfg.sweep
    url = sc.storage or f"sqlite:///{(run_dir / 'optuna.db').resolve()}"
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    if sc.sampler == "tpe":
        sampler = optuna.samplers.TPESampler(n_startup_trials=sc.startup_trials, multivariate=True, constant_liar=True)
    else:
        sampler = optuna.samplers.RandomSampler()
    pruner = (
        optuna.pruners.MedianPruner(n_startup_trials=sc.pruner_startup_trials)
        if sc.pruner == "median"
        else optuna.pruners.NopPruner()
    )
    direction = "maximize" if METRICS[cfg.train.metric].higher_is_better else "minimize"
    for attempt in range(5):  # two workers creating the tables of a new SQLite file at once: one retries
        try:
            storage = optuna.storages.RDBStorage(url, engine_kwargs=engine)
            return optuna.create_study(storage=storage, study_name=cfg.experiment, direction=direction,
                                       sampler=sampler, pruner=pruner, load_if_exists=True)  # fmt: skip
        except Exception:
            if attempt == 4:
                raise
            time.sleep(1.0 + attempt)
    raise AssertionError("unreachable")


def check_storage(url: str) -> None:
    """Open an Optuna storage URL once (creating its tables), or ConfigError with one line, the password hidden:
    a wrong URL, a missing driver or a server that refuses is found before anything is written."""
    import optuna

    try:
        optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True})
    except Exception as e:
        message = f"sweep.storage: cannot open {url}: {type(e).__name__}: {e}".split("\n")[0]
        raise ConfigError(re.sub(r"//[^@/\s]*@", "//***@", message)) from None


class TrialRunner:
    """Trains one claimed trial slot: ask the study for a trial, train its config on sweep.folds, tell the result."""

    def __init__(self, study: Study, optuna_study: optuna.Study | None, space: list[Param], stop: threading.Event):
        self.study, self.optuna_study, self.space, self.stop = study, optuna_study, space, stop
        self.trial: Any = None  # rank 0's optuna.Trial of the slot it trains

    def run(self, claim: Claim, beat: Heartbeat) -> None:
        study = self.study
        number, values = study.ranks.primary(lambda: self._ask(claim))
        trial_cfg = apply_values(study.cfg, values)
        study.ranks.log(f"distrain: {claim.job_id}: trial {number}: {format_values(values)}")
        run_id = study.tracker.start_job(
            f"trial-{number}",
            {**values, "trial": number},
            {"distrain.kind": "trial", "trial": number, "slot": claim.job_id, "worker": study.worker},
        )
        try:
            score = self._train(trial_cfg, run_id, beat)
        except _Pruned as e:
            study.ranks.primary(lambda: self._tell(state="PRUNED"))
            study.ranks.log(f"distrain: {claim.job_id}: trial {number} pruned ({e})")
            study.tracker.end_run(run_id)
            return
        except Interrupted:
            lost = study.ranks.primary(lambda: beat.lost.is_set())
            study.ranks.primary(lambda: self._tell(state="FAIL"))
            study.tracker.end_run(run_id, "KILLED")
            raise (LeaseLost if lost else Preempted)(str(claim)) from None
        except BaseException as e:
            study.ranks.primary(lambda: self._tell(state="FAIL"))
            study.tracker.end_run(run_id, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
            raise
        study.ranks.primary(lambda: self._tell(value=score))
        study.tracker.log_metrics(run_id, {f"trial_{study.cfg.train.metric}": score}, step=0)
        study.tracker.end_run(run_id)
        study.ranks.log(f"distrain: {claim.job_id}: trial {number} val_{study.cfg.train.metric} {score:.4f}")

    def _train(self, trial_cfg: Config, run_id: str, beat: Heartbeat) -> float:
        """The trial's config trained on each fold of sweep.folds; the mean of their best validation scores."""
        from distrain.training.loop import JobControl, fit_job

        study, epochs = self.study, trial_cfg.train.epochs
        job_of = Job(trial_cfg.model.names[0], trial_cfg.cv.seeds[0], 0)
        scores = []
        for i, fold in enumerate(trial_cfg.sweep.folds):
            control = JobControl(
                progress=beat.progress,
                stop_requested=lambda: self.stop.is_set() or beat.lost.is_set(),
                after_epoch=lambda epoch, val, i=i: self._report(i * epochs + epoch, val),
                first_step=i * epochs,  # the trial's run: fold after fold, one row per step
            )
            job = dataclasses.replace(job_of, fold=fold)
            result = fit_job(job, trial_cfg, study.index, study.manifest.fold_of_sample, study.accelerator,
                             study.tracker, run_id, control)  # fmt: skip
            scores.append(result.val_score)
        return float(sum(scores) / len(scores))

    def _report(self, step: int, val: float) -> None:
        """Tell the pruner this epoch's score (rank 0); every rank stops together if it says so."""

        def report() -> bool:
            self.trial.report(val, step)
            return self.trial.should_prune()

        if self.study.ranks.primary(report):
            raise _Pruned(f"at epoch {step + 1}, val {val:.4f}")

    def _ask(self, claim: Claim) -> tuple[int, dict[str, Any]]:
        """Rank 0: fail the trial an earlier attempt of this slot left RUNNING, ask for a new one, remember it."""
        from optuna.trial import TrialState

        marker = self.study.run_dir / "trials" / f"{claim.job_id}.json"
        if marker.is_file():
            previous = json.loads(marker.read_text())["trial"]
            if self.optuna_study.get_trials(deepcopy=False)[previous].state == TrialState.RUNNING:
                self.optuna_study.tell(previous, state=TrialState.FAIL, skip_if_finished=True)
                self.study.ranks.log(f"distrain: {claim.job_id}: trial {previous} of a vanished worker marked failed")
        self.trial = self.optuna_study.ask()
        atomic_write_json(marker, {"trial": self.trial.number, "attempt": claim.attempt, "worker": claim.worker})
        return self.trial.number, suggest(self.trial, self.space)

    def _tell(self, value: float | None = None, state: str = "COMPLETE") -> None:
        from optuna.trial import TrialState

        if value is not None:
            self.optuna_study.tell(self.trial, value)
        else:
            self.optuna_study.tell(self.trial, state=getattr(TrialState, state), skip_if_finished=True)


def finish_sweep(study: Study, optuna_study: optuna.Study, base: Config, states: list[JobState]) -> None:
    """The sweep's last step (claimed like a study's aggregation, done once per slot set): fail trials left
    RUNNING, write sweep.json and best.yaml, log them to the sweep run, print the trials table."""
    from optuna.trial import TrialState

    for t in optuna_study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        optuna_study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)  # its worker is gone
    trials = optuna_study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best = optuna_study.best_trial if complete else None
    summary = {
        "metric": base.train.metric,
        "direction": optuna_study.direction.name.lower(),
        "slots": len(states),
        "failed_slots": [s.job_id for s in states if s.status == JobStatus.FAILED],
        "counts": {state.name: sum(t.state == state for t in trials) for state in TrialState},
        "trials": [
            {
                "number": t.number,
                "state": t.state.name,
                "value": t.value,
                "params": t.params,
                "epochs_reported": len(t.intermediate_values),
            }
            for t in trials
        ],  # fmt: skip
        "best": {"number": best.number, "value": best.value, "params": best.params} if best else None,
    }
    run_dir, tracker = study.run_dir, study.tracker
    atomic_write_json(run_dir / "sweep.json", summary)
    files = [run_dir / "sweep.json"]
    if best is not None:
        atomic_write_text(run_dir / "best.yaml", dump_yaml(apply_values(base, best.params)))
        files.append(run_dir / "best.yaml")
        tracker.log_metrics(tracker.parent_run_id, {f"best_{base.train.metric}": best.value}, step=len(trials))
    for f in files:
        tracker.log_artifact(tracker.parent_run_id, f)
    tracker.end_run(tracker.parent_run_id)
    print(format_trials(summary), flush=True)


def format_trials(summary: dict) -> str:
    """The trials as a table, best first among the finished ones, then the counts."""
    metric = summary["metric"]
    rows = sorted(summary["trials"], key=lambda t: (t["value"] is None, t["number"]))
    best = summary["best"]["number"] if summary["best"] else None
    lines = [f"{'trial':>5}  {'state':<8} {metric:>10}  epochs  params"]
    for t in rows:
        value = f"{t['value']:.4f}" if t["value"] is not None else "-"
        params = format_values(t["params"])
        mark = "  <- best" if t["number"] == best else ""
        lines.append(f"{t['number']:>5}  {t['state']:<8} {value:>10}  {t['epochs_reported']:>6}  {params}{mark}")
    counts = ", ".join(f"{n.lower()} {c}" for n, c in summary["counts"].items() if c)
    lines.append(f"sweep: {len(summary['trials'])} trials ({counts}) for {summary['slots']} slots")
    return "\n".join(lines)


def format_values(values: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())


def _finish_worker(study: Study, outcome: WorkerOutcome) -> None:
    if outcome.preempted:
        study.ranks.log(
            f"distrain: {study.worker}: stopped by SIGTERM; its trial marked failed, slot released (exit 75)"
        )
    runtime.end_process_group(study.accelerator)
