"""`distrain distill`: a finished study's ensemble distilled into one network, with honest scores.

    teacher    the registered ensemble of the study at `run_dir`, as soft targets of the CV samples (written
               once into the student study: `soft_targets.npz`, `study.soft_targets`; never a holdout sample): each
               sample's out-of-fold row, from the fold models that did not train on it, and each fold's models' rows
    student    a derived study `<experiment>-student` (beside the teacher's run directory, the same folds):
               the student model on every fold with `distill.*` set; its fold-m job learns fold m's teacher models'
               rows (which never saw fold m), so its OOF and CV score are honest
    baseline   the same student on hard labels only (`<experiment>-student-hard`), for the comparison
    served     each once more on the whole CV pool (the OOF rows as targets) for the median best epoch of its
               folds (+1), validated on nothing; the distilled one is registered as `distrain-<experiment>-student`
    report     CV and holdout of the teacher, its best single column, the student and the baseline, with each
               one's serving cost (samples/s through the predictor the pyfunc wraps, networks, parameters):
               `<student run dir>/distill.json`, printed, and on the student study's MLflow run

The student studies are ordinary run directories: `--prepare` writes their configs and stops, so that they can be
trained like any study (`accelerate launch distrain/run.py --config ...`, `distrain schedule`, Kubernetes); running
`distrain distill` again then skips what is done and finishes.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from distrain.config import Config, apply_overrides, config_from_dict, dump_yaml
from distrain.console import route_library_output
from distrain.data.index import read_index
from distrain.ensembles.aggregate import Source, load_store
from distrain.ensembles.report import Report
from distrain.ensembles.store import SampleTruth
from distrain.ensembles.voting import soft_vote
from distrain.errors import BadInput, ConfigError, Interrupted, Preempted
from distrain.fsutil import atomic_write_json, atomic_write_text
from distrain.orchestration import phases
from distrain.orchestration.combined import SOURCES
from distrain.study.folds import FoldManifest
from distrain.study.plan import WHOLE_POOL, Job, column_key
from distrain.study.soft_targets import SoftTargets, write_soft_targets
from distrain.tasks import get_task

SOFT_TARGETS = "soft_targets.npz"


@dataclass(frozen=True)
class DistillRequest:
    """What `distrain distill` was asked for."""

    run_dir: Path
    student: str
    temperature: float = 3.0
    alpha: float = 0.7
    seeds: tuple[int, ...] = ()
    """The student's seeds; empty: the teacher study's first."""
    hard_baseline: bool = True
    prepare_only: bool = False
    overrides: tuple[str, ...] = ()
    """`a.b=value` overrides of the student studies' configs (e.g. train.epochs=20)."""


def teacher_soft_targets(cfg: Config, run_dir: Path) -> tuple[SoftTargets, str]:
    """The registered ensemble's soft targets of the CV samples (`study.soft_targets`) and its name: its weighted
    mean of the columns' OOF rows, and of each fold's models' rows, with the served weights (a registered stacking
    model: its weighted vote's weights)."""
    from distrain.serving.predictor import EnsemblePredictor
    from distrain.serving.teacher import fold_ensemble_rows

    registered_name(run_dir)
    index = read_index(cfg.data.root, cfg.data.num_classes, cfg.task)
    manifest = FoldManifest.from_json((run_dir / "folds.json").read_text())
    truth = SampleTruth(manifest.fold_of_sample, {**index.labels_of("cv"), **index.labels_of("test")})
    store, _ = load_store(cfg, [Source(run_dir, cfg)], truth, allow_partial=False)
    predictor = EnsemblePredictor(run_dir / "ensemble" / "model")
    weight = dict(zip(predictor.meta["columns"], predictor.meta["weights"]))
    oof = soft_vote(store.oof, np.asarray([weight.get(c, 0.0) for c in store.columns]))
    rows = fold_ensemble_rows(predictor, index.urls("cv"), cfg.cv.folds)
    if rows.sample_ids != store.sample_ids:
        raise BadInput(f"distill: {cfg.data.root}'s CV shards do not hold the study's CV samples")
    return SoftTargets(rows.sample_ids, oof, rows.probs), predictor.meta["ensemble"]


def student_config(teacher: Config, req: DistillRequest, experiment: str, distill: dict) -> Config:
    """The teacher's config turned into a student study's: one backbone (its own overrides kept), the seeds asked
    for, no Mixup / CutMix (they would mix images but not soft targets), no registered fold ensemble."""
    raw = teacher.to_dict()
    raw["experiment"], raw["run_root"] = experiment, str(req.run_dir.parent)
    own, args = raw["model"]["overrides"].get(req.student), raw["model"]["factory_args"].get(req.student)
    raw["model"].update(names=[req.student], overrides={req.student: own} if own else {},
                        factory_args={req.student: args} if args else {})  # fmt: skip
    raw["cv"]["seeds"] = list(req.seeds or teacher.cv.seeds[:1])
    raw["cv"]["only_folds"] = []
    raw["augment"].update(mixup=0.0, cutmix=0.0)
    raw["ensemble"].update(register_model=False, model_name="", members={})  # members named the teacher's columns
    raw["distill"] = distill
    raw["pseudo"], raw["data"]["unlabelled"] = {}, ""  # a pseudo-label round's teacher distils its own labelled data
    return config_from_dict(apply_overrides(raw, list(req.overrides)))


def whole_pool_epochs(report: Report) -> int:
    """The epochs of a whole-pool job: the median best epoch of the study's jobs, plus one (epochs count from 0)."""
    return int(statistics.median(j["best_epoch"] for j in report.jobs if j["status"] == "done")) + 1


def prepare(req: DistillRequest) -> tuple[Config, list[Config], str]:
    """The teacher's config, the student studies' configs (distilled first), the teacher ensemble's name; the soft
    targets written into the student study (kept when it has them: a rerun resumes on the same targets) and the
    teacher's fold manifest with them (a student split otherwise is refused). Refuses a dense, combined or
    unfinished teacher study and a bad student in one line before anything is written."""
    if (req.run_dir / SOURCES).is_file():
        raise BadInput(f"distill: {req.run_dir} ensembles other run directories; give one study's run directory")
    teacher = phases.load_run_dir(req.run_dir)
    if get_task(teacher.task).dense:
        raise BadInput(f"distill: task {teacher.task} predicts maps, not the probability rows soft targets are")
    student = student_config(teacher, req, f"{teacher.experiment}-student", {"temperature": req.temperature,
                                                                             "alpha": req.alpha})  # fmt: skip
    path = (student.run_dir / SOFT_TARGETS).resolve()
    configs = [dataclasses.replace(student, distill=dataclasses.replace(student.distill, teacher=str(path)))]
    if req.hard_baseline:
        configs.append(student_config(teacher, req, f"{teacher.experiment}-student-hard", {"alpha": 0.0}))
    for cfg in configs:
        if cfg.run_dir.resolve() == req.run_dir.resolve():
            raise ConfigError(f"distill: the student study would be {cfg.run_dir}, the teacher's own")
    if not path.is_file():
        targets, _ = teacher_soft_targets(teacher, req.run_dir)
        write_soft_targets(path, targets)
    for cfg in configs:
        share_fold_manifest(req.run_dir, cfg.run_dir)
        atomic_write_text(cfg.run_dir / "distill.yaml", dump_yaml(cfg))
    return teacher, configs, registered_name(req.run_dir)


def share_fold_manifest(first: Path, derived: Path) -> None:
    """Give a derived study the first study's folds.json: its own split must then be the same (or is refused),
    since what it learns from the first study's models is keyed by fold."""
    derived.mkdir(parents=True, exist_ok=True)
    if not (derived / "folds.json").is_file():
        atomic_write_text(derived / "folds.json", (first / "folds.json").read_text())


def registered_name(run_dir: Path) -> str:
    """The registered ensemble's name (meta.json), or BadInput when the study has none."""
    meta = run_dir / "ensemble" / "model" / "meta.json"
    if not meta.is_file():
        raise BadInput(f"{run_dir} has no registered ensemble (ensemble/model/meta.json); aggregate it first")
    return json.loads(meta.read_text())["ensemble"]


def run_distill(req: DistillRequest) -> int:
    """Soft targets, the student studies, their whole-pool networks, the report. Returns the exit code."""
    from distrain.orchestration.experiment import run_experiment

    route_library_output(req.run_dir)
    teacher, configs, ensemble = prepare(req)
    for cfg in configs:
        print(f"distrain: student study config: {cfg.run_dir / 'distill.yaml'}", flush=True)
    if req.prepare_only:
        return 0
    for cfg in configs:
        code = run_experiment(cfg)
        if code != 0:
            return code
    served = [fit_whole_pool(cfg) for cfg in configs]
    registered = register_student(configs[0], served[0], teacher)
    return write_distill_report(teacher, req.run_dir, configs, served, ensemble, registered)


def fit_whole_pool(cfg: Config) -> Job:
    """The study's backbone and first seed trained on every CV sample for `whole_pool_epochs` (skipped when its
    files are there): the network a distilled study serves. Its state is checkpointed, so a rerun resumes it."""
    from distrain import interrupts
    from distrain.distributed import runtime
    from distrain.study.results import job_dir, job_files_problem
    from distrain.training.loop import JobControl, fit_job
    from distrain.training.outputs import write_job_outputs

    report = phases.finished_report(cfg.run_dir)
    job = Job(cfg.model.names[0], cfg.cv.seeds[0], WHOLE_POOL)
    if job_files_problem(cfg.run_dir, job) is None:
        return job
    whole = whole_pool_config(cfg.for_model(job.model), whole_pool_epochs(report))
    index = read_index(cfg.data.root, cfg.data.num_classes, cfg.task)
    manifest = FoldManifest.from_json((cfg.run_dir / "folds.json").read_text())
    print(f"distrain: {job.id}: every CV sample, {whole.train.epochs} epochs (the folds' median best + 1)", flush=True)
    accelerator = runtime.create_accelerator(whole.train)
    control = JobControl(state_dir=job_dir(cfg.run_dir, job) / "state", scheduler=cfg.scheduler,
                         stop_requested=interrupts.STOP.is_set)  # fmt: skip
    try:
        with interrupts.deferred():  # SIGTERM: the job saves its state at the next step and stops
            result = fit_job(job, whole, index, manifest.fold_of_sample, accelerator, None, "", control)
    except Interrupted:
        raise Preempted(f"{job.id}: stopped by SIGTERM with its state saved; run `distrain distill` again to "
                        "resume it") from None  # fmt: skip
    write_job_outputs(cfg.run_dir, result, whole.to_dict())
    return job


def whole_pool_config(cfg: Config, epochs: int) -> Config:
    """`cfg` (its backbone's overrides applied) for a whole-pool job of `epochs` epochs: no early stop, the
    progressive-resolution and batch-size schedules cut to the epochs run."""
    train, data = cfg.train, cfg.data
    sizes = {e: v for e, v in data.image_size_schedule.items() if e < epochs}
    if sizes:
        sizes[max(sizes)] = data.image_size  # the last phase at the evaluated size, as the checks ask
    batches = {e: v for e, v in train.batch_size_schedule.items() if e < epochs}
    model = dataclasses.replace(cfg.model, overrides={})  # applied already: fit_job must not apply them again
    return dataclasses.replace(cfg, model=model, data=dataclasses.replace(data, image_size_schedule=sizes),
                               train=dataclasses.replace(train, epochs=epochs, patience=0, max_train_val_gap=0.0,
                                                         batch_size_schedule=batches))  # fmt: skip


def register_student(cfg: Config, job: Job, teacher: Config) -> Optional[dict]:
    """The distilled whole-pool network as a pyfunc model `distrain-<teacher experiment>-student` on the student
    study's MLflow run (with the thresholds its OOF tuned, for a task that has them)."""
    from distrain.serving.artifacts import write_single_model_artifacts
    from distrain.serving.register import PYFUNC
    from distrain.tracking.base import model_entry

    if not teacher.ensemble.register_model:
        return None
    done = cfg.run_dir / "distill.json"
    if done.is_file() and json.loads(done.read_text()).get("student_model"):
        return json.loads(done.read_text())["student_model"]  # a rerun: registered already, the same network
    report, index = phases.finished_report(cfg.run_dir), read_index(cfg.data.root, cfg.data.num_classes, cfg.task)
    threshold = (report.thresholds or {}).get("best_single", {}).get("threshold")
    dest = cfg.run_dir / "student" / "model"
    write_single_model_artifacts(cfg, job, cfg.run_dir, dest, index.classes, index.channels, threshold)
    name = f"distrain-{teacher.experiment}-student"
    tracker = phases.open_tracker(cfg, cfg.run_dir)
    tags = {"distrain.distilled_from": teacher.experiment, "distrain.job": job.id}
    version = tracker.log_ensemble_model(report.mlflow["parent_run_id"], dest, name, PYFUNC, tags)
    return model_entry(name, version)


def write_distill_report(teacher: Config, run_dir: Path, configs: list[Config], served: list[Job], ensemble: str,
                         registered: Optional[dict]) -> int:  # fmt: skip
    """distill.json beside the student study, the printed table, metrics on the student study's MLflow run."""
    from distrain.orchestration.distill_report import distill_rows, format_rows, log_rows

    rows = distill_rows(teacher, run_dir, configs, served, ensemble)
    out = configs[0].run_dir / "distill.json"
    payload = {"teacher": str(run_dir), "metric": teacher.train.metric, "rows": rows, "student_model": registered,
               "distill": dataclasses.asdict(configs[0].distill)}  # fmt: skip
    atomic_write_json(out, payload)
    print(format_rows(rows, teacher.train.metric), flush=True)
    log_rows(configs[0], rows, out)
    print(f"distrain: distillation report: {out}", flush=True)
    return 0


def column_of(cfg: Config) -> str:
    return column_key(cfg.model.names[0], cfg.cv.seeds[0])
