"""`distrain` console script: wiring only.

distrain data digits [--out DIR] [--task T]    scikit-learn's digits as WebDataset shards
distrain data pack (--images DIR [--detection ANN.json | --masks DIR [--groups CSV]] | --csv FILE [--multilabel]
                   | --npz FILE [--test FILE] [--images KEY]) --out DIR
distrain data synth-text|synth-shapes --out DIR --images N [--seed S]
                                               receipts with word polygons / shapes with class-id masks
distrain train --config FILE [a.b=value ...]   the main job (same as distrain/run.py)
distrain schedule --config FILE --workers W (--procs-per-worker P | --gpus-per-worker G) [a.b=value ...]
                                               W workers on this node, one ledger (--num-machines M
                                               --main-process-ip H: one worker over M nodes)
distrain aggregate --run-dir DIR [--run-dir DIR2 ... [--out DIR]] [--allow-partial] [ensemble.k=v ...]
                                               report + voting + stacking, without training, of one run
                                               directory or across several (`distrain ensemble` is the same)
distrain sweep --config FILE --space FILE --trials N [--write-best FILE] [a.b=value ...]
                                               one Optuna sweep worker (start several: they share the trials)
distrain status --run-dir DIR [--json]         pending / running (owner, progress, heartbeat) / done / failed
distrain retry --run-dir DIR [--job ID ...]    jobs failed for good pending again (after fixing their cause)
distrain sync --run-dir DIR                    send tracking buffered while MLflow was down
distrain k8s render --config FILE --workers N [--gpus-per-worker G] [--mode indexed|queue|multinode] --out DIR
                                               Kubernetes manifests (kustomize) from the config
distrain predict --run-dir DIR (--images DIR | --shards DIR) --out FILE.csv|FILE.json|DIR [--model-uri URI]
                                               the ensemble on unlabelled images of any size
distrain adversarial --run-dir DIR [--against test|DIR]
                                               do the holdout's (a folder's) images look like the CV images?
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from distrain.console import route_library_output
from distrain.errors import BadInput, Preempted, exit_with_line, refuse, storage_error
from distrain.fsutil import atomic_write_json
from distrain.names import AttemptEnd, JobStatus
from distrain.tasks import DEFAULT_TASK, TASKS, get_task


def _data(args) -> int:
    from distrain.data.pack import ShardLimits, write_dataset, write_digits

    if args.what in ("synth-text", "synth-shapes"):
        return _synthetic(args)
    if args.what == "digits":
        index = write_digits(args.out, test_fraction=args.test_fraction, shard_size=args.shard_size or 64,
                             task=args.task)  # fmt: skip
    else:
        samples, classes = _samples_to_pack(args)
        if not samples:
            raise BadInput("data pack: no images found")
        channels = None if args.channels == "auto" else int(args.channels)
        limits = ShardLimits(max_mb=args.shard_mb, max_samples=args.shard_size or 0, min_shards=args.min_shards)
        index = write_dataset(samples, args.out, classes=classes, channels=channels,
                              test_fraction=args.test_fraction, limits=limits)  # fmt: skip
    print(
        f"distrain: wrote {len(index.split_ids('cv'))} CV + {len(index.split_ids('test'))} test samples, "
        f"{len(index.classes)} classes, {index.channels} channel(s), {len(index.cv_shards)}+{len(index.test_shards)} "
        f"shards to {index.root}"
    )
    return 0


def _synthetic(args) -> int:
    """`distrain data synth-text|synth-shapes --out DIR --images N`: generated receipts with word polygons, or
    shapes with class-id masks."""
    try:
        count = int(args.images or 0)
    except ValueError:
        count = 0
    if count < 1:
        raise BadInput(f"data {args.what}: --images N needs a positive number of images, got {args.images!r}")
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise BadInput(f"data {args.what}: {out} exists and is not empty")
    if args.what == "synth-text":
        from distrain.data.synth_text import write_synth_text

        path = write_synth_text(out, count, seed=args.seed)
        print(f"distrain: wrote {count} synthetic receipts to {out / 'images'} and their word polygons to {path}")
    else:
        from distrain.data.synth_shapes import write_synth_shapes

        write_synth_shapes(out, count, seed=args.seed)
        print(f"distrain: wrote {count} images of shapes to {out / 'images'} and their masks to {out / 'masks'}")
    return 0


def _samples_to_pack(args) -> tuple[list, list[str]]:
    """The samples `distrain data pack` was pointed at: a folder of class folders, a CSV, or npz arrays."""
    from distrain.data.pack import samples_from_csv, samples_from_folder

    if args.groups and not args.masks:
        raise BadInput("data pack: --groups CSV goes with --masks DIR (detection entries carry their own group)")
    if args.masks:
        if args.npz or args.csv or args.detection or not args.images:
            raise BadInput("data pack: --masks DIR goes with --images DIR (the images of the masks) only")
        from distrain.data.masks import samples_from_masks

        return samples_from_masks(args.images, args.masks, groups=args.groups)
    if args.detection:
        if args.npz or args.csv or not args.images:
            raise BadInput("data pack: --detection ANN.json goes with --images DIR (the annotated images) only")
        from distrain.data.detection import samples_from_detection

        return samples_from_detection(args.detection, args.images)
    if sum(map(bool, (args.npz, args.csv, args.images and not args.npz))) != 1:
        raise BadInput("data pack: give exactly one of --images DIR, --csv FILE or --npz FILE")
    if args.label_sets and not args.csv:
        raise BadInput("data pack: --multilabel needs --csv FILE (label lists per row)")
    if args.test and not args.npz:
        raise BadInput("data pack: --test FILE goes with --npz (a folder or CSV holdout is --test-fraction)")
    if args.npz:
        from distrain.data.arrays import samples_from_npz

        return samples_from_npz(args.npz, args.test, args.images or "x", args.label, args.group)
    return samples_from_folder(args.images) if args.images else samples_from_csv(args.csv, args.label_sets)


def _status_rows(run_dir: Path) -> dict:
    """Every job's ledger state (with its score once done), the aggregation's, and what awaits sync."""
    from distrain.orchestration.combined import refuse_combined
    from distrain.orchestration.ledger import aggregate_id
    from distrain.orchestration.phases import load_run_dir, open_ledger
    from distrain.study.plan import expand_plan
    from distrain.study.results import job_files_problem, read_done
    from distrain.tracking.buffer import pending_calls

    refuse_combined(run_dir, "status")
    cfg = load_run_dir(run_dir)
    ledger = open_ledger(cfg, run_dir)
    rows, plan = [], expand_plan(cfg)
    for job in plan:
        st = ledger.state(job.id).to_dict()
        problem = job_files_problem(run_dir, job)
        if st["status"] != JobStatus.DONE and problem is None:  # finished before the ledger recorded it
            st["status"] = JobStatus.DONE
        elif st["status"] == JobStatus.DONE and problem is not None:  # the next run of the main command retrains it
            st["status"], st["last_error"] = AttemptEnd.DAMAGED, problem
        st["val_score"] = read_done(run_dir, job)["val_score"] if st["status"] == JobStatus.DONE else None
        rows.append(st)
    counts = {s: sum(r["status"] == s for r in rows) for s in (*JobStatus, AttemptEnd.DAMAGED)}
    counts = {s: n for s, n in counts.items() if n or s != AttemptEnd.DAMAGED}
    return {
        "run_dir": str(run_dir),
        "counts": counts,
        "jobs": rows,
        "aggregate": ledger.state(aggregate_id([j.id for j in plan])).to_dict(),
        "report": (run_dir / "report.json").is_file(),
        "pending_tracking_calls": pending_calls(run_dir),
    }


def _status(args) -> int:
    summary = _status_rows(Path(args.run_dir))
    if args.json:
        print(json.dumps(summary))
        return 0
    print(f"{'job':<28} {'status':<8} {'owner':<24} {'progress':<18} {'heartbeat':>9} {'tries':>5}  score / error")
    for r in summary["jobs"] + [summary["aggregate"]]:
        p = r["progress"]
        progress = (
            f"ep {p.get('epoch', 0) + 1}/{p.get('epochs', '?')} st {p.get('step', 0)}/{p.get('steps', '?')}"
            if r["status"] == JobStatus.RUNNING and "epochs" in p
            else ""
        )
        age = f"{r['heartbeat_age_s']:.0f}s ago" if r["heartbeat_age_s"] is not None else ""
        tail = f"{r['val_score']:.4f}" if r.get("val_score") is not None else r["last_error"][:80]
        print(
            f"{r['job_id']:<28} {r['status']:<8} {r['owner'][:24]:<24} {progress:<18} {age:>9} "
            f"{r['attempts']:>5}  {tail}"
        )
    pending = summary["pending_tracking_calls"]
    print(
        " ".join(f"{k} {v}" for k, v in summary["counts"].items())
        + f"; report.json {'written' if summary['report'] else 'not yet'}"
        + (f"; {pending} tracking calls await `distrain sync`" if pending else "")
    )
    return 0


def _retry(args) -> int:
    """Jobs failed for good made pending again (their earlier attempts no longer count), and the aggregation with
    them, so that the next run of the main command trains them once the cause is fixed."""
    from distrain.orchestration.ledger import aggregate_id
    from distrain.orchestration.phases import load_run_dir, open_ledger
    from distrain.study.plan import expand_plan

    run_dir = Path(args.run_dir)
    cfg = load_run_dir(run_dir)
    ledger, job_ids = open_ledger(cfg, run_dir), [j.id for j in expand_plan(cfg)]
    unknown = sorted(set(args.job) - set(job_ids))
    if unknown:
        raise BadInput(f"retry: {unknown[0]!r} is not a job of {run_dir} (its jobs: {', '.join(job_ids)})")
    failed = [s.job_id for s in ledger.states(args.job or job_ids) if s.status == JobStatus.FAILED]
    aggregation = ledger.state(aggregate_id(job_ids))
    if not failed and aggregation.status != JobStatus.FAILED:
        print(f"distrain: {run_dir}: nothing to retry (no job failed for good)")
        return 0
    retried = [j for j in failed if ledger.requeue(j, "distrain retry", mark=AttemptEnd.RETRIED)]
    if aggregation.status in (
        JobStatus.DONE,
        JobStatus.FAILED,
    ):  # it ran without them (or failed): once more, with them
        ledger.requeue(aggregation.job_id, "distrain retry", mark=AttemptEnd.RETRIED)
    print(f"distrain: {len(retried)} job(s) pending again{': ' + ', '.join(retried) if retried else ''}; run the main "
          f"command (or `distrain schedule`) with the same config to train them and aggregate")  # fmt: skip
    return 0


def _aggregate(args) -> int:
    """One run directory's ensembles again, or one ensemble over several that share a fold manifest."""
    from distrain.data.index import read_index
    from distrain.ensembles.aggregate import Source
    from distrain.ensembles.store import SampleTruth
    from distrain.orchestration import phases
    from distrain.orchestration.aggregation import aggregate_study
    from distrain.orchestration.combined import combine_run_dirs, refuse_combined
    from distrain.study.folds import FoldManifest
    from distrain.study.plan import expand_plan

    run_dirs = [Path(d) for d in args.run_dir]
    if len(run_dirs) > 1:
        combined = combine_run_dirs(run_dirs, Path(args.out) if args.out else None, args.overrides)
        cfg, run_dir, sources, manifest = combined.cfg, combined.out, combined.sources, combined.manifest
    else:
        if args.out:
            raise BadInput("--out: for an ensemble across run directories (give --run-dir two or more times)")
        run_dir = run_dirs[0]
        refuse_combined(run_dir, "aggregate")
        cfg = phases.reconfigure_ensembles(run_dir, args.overrides)
        sources, manifest = [Source(run_dir, cfg)], FoldManifest.from_json((run_dir / "folds.json").read_text())
    route_library_output(run_dir)
    index = read_index(cfg.data.root, cfg.data.num_classes, cfg.task)
    failed = [
        {**f, "id": src.prefix + f["id"]}
        for src in sources
        for f in phases.failed_jobs(phases.open_ledger(src.cfg, src.run_dir), expand_plan(src.cfg))
    ]
    truth = SampleTruth(manifest.fold_of_sample, {**index.labels_of("cv"), **index.labels_of("test")})
    tracker = phases.open_tracker(cfg, run_dir)
    aggregate_study(cfg, run_dir, tracker, truth, failed, sources=sources, allow_partial=args.allow_partial)
    return 0


def _sweep(args) -> int:
    from distrain.config import load_config
    from distrain.orchestration.sweep import check_storage, run_sweep, sweep_run_dir
    from distrain.study.space import load_space

    cfg = load_config(args.config, args.overrides)
    space = load_space(args.space, cfg)  # every range checked before any trial starts
    if args.trials < 1:
        raise BadInput(f"--trials: expected at least 1, got {args.trials}")
    if cfg.sweep.storage:
        check_storage(cfg.sweep.storage)
    code = run_sweep(cfg, space, args.trials)
    if args.write_best:
        best = sweep_run_dir(cfg) / "best.yaml"
        if not best.is_file():
            raise BadInput(f"{best}: no best config yet (no trial finished, or other workers still run trials)")
        from distrain.fsutil import atomic_write_text

        atomic_write_text(args.write_best, best.read_text())
        print(f"distrain: best config written to {args.write_best}")
    return code


def _sync(args) -> int:
    from distrain import interrupts
    from distrain.orchestration import phases
    from distrain.tracking.buffer import pending_calls, sync_buffers

    run_dir = Path(args.run_dir)
    cfg = phases.load_run_dir(run_dir)
    if not pending_calls(run_dir):
        print(f"distrain: {run_dir}: nothing to sync")
        return 0
    route_library_output(run_dir)
    tracker = phases.open_tracker(cfg, run_dir)
    if tracker.offline and not tracker.experiment_id:
        raise BadInput(f"tracking server {tracker.tracking_uri} is still unreachable; nothing was synced")
    tracker.go_online()
    try:
        with interrupts.deferred():  # SIGTERM: stop between two calls, progress saved (exit 75)
            result = sync_buffers(tracker)
    except Preempted:
        raise
    except Exception as e:
        raise BadInput(
            f"sync stopped ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
            f"run it again to continue where it stopped"
        ) from None
    print(
        f"distrain: synced {result['synced']} tracking calls from {result['files']} buffer file(s) "
        f"to {tracker.tracking_uri}"
    )
    return 0


def _predict(args) -> int:
    from distrain.orchestration import phases
    from distrain.serving.predictor import EnsemblePredictor, predict_folder, predict_shards, write_predictions_csv
    from distrain.tracking.base import resolve_tracking_uri

    run_dir = Path(args.run_dir)
    cfg = phases.load_run_dir(run_dir)
    if bool(args.images) == bool(args.shards):
        raise BadInput("predict: give exactly one of --images DIR or --shards DIR")
    route_library_output(run_dir)
    if get_task(cfg.task).dense:
        return _predict_dense(args, run_dir, cfg)
    if args.model_uri:
        from distrain.serving.pyfunc import load_registered_predictor

        predictor = load_registered_predictor(args.model_uri, resolve_tracking_uri(cfg.tracking.uri, run_dir.parent))
    else:
        model_dir = run_dir / "ensemble" / "model"
        if not (model_dir / "meta.json").is_file():
            raise BadInput(f"{model_dir}: no ensemble model (the run has not aggregated, or ensemble.register_model"
                           f" was false); give --model-uri models:/<name>/<version>")  # fmt: skip
        predictor = EnsemblePredictor(model_dir)
    source = Path(args.images or args.shards)
    if not source.is_dir():
        raise BadInput(f"predict: not a folder: {source}")
    if args.second_images and not args.images:
        raise BadInput("predict: --second-images DIR goes with --images DIR (the pairs' first images)")
    if args.images:
        second = Path(args.second_images) if args.second_images else None
        if second is not None and not second.is_dir():
            raise BadInput(f"predict: not a folder: {second}")
        names, probs = predict_folder(predictor, source, second=second)
    else:
        names, probs = predict_shards(predictor, source)
    write_predictions_csv(Path(args.out), names, probs, predictor.classes, predictor.decide(probs))
    print(f"distrain: wrote {len(names)} predictions ({len(predictor.classes)} classes) to {args.out}")
    return 0


def _predict_dense(args, run_dir: Path, cfg) -> int:
    """`distrain predict` of a dense study: a text-detection study's voted boxes of every image as JSON (--out
    FILE.json), a segmentation study's masks as PNGs (--out DIR)."""
    from distrain.serving.detection import DetectionPredictor, predict_detection_folder

    if not args.images or args.second_images:
        raise BadInput(f"predict: a {cfg.task} study predicts --images DIR (no --shards, no pairs)")
    folder = Path(args.images)
    if not folder.is_dir():
        raise BadInput(f"predict: not a folder: {folder}")
    if args.model_uri:
        from distrain.serving.pyfunc import load_registered_predictor
        from distrain.tracking.base import resolve_tracking_uri

        predictor = load_registered_predictor(args.model_uri, resolve_tracking_uri(cfg.tracking.uri, run_dir.parent))
    elif get_task(cfg.task).annotation == "json":
        predictor = DetectionPredictor(run_dir / "ensemble" / "model")
    else:
        from distrain.serving.masks import MaskPredictor

        predictor = MaskPredictor(run_dir / "ensemble" / "model")
    if not isinstance(predictor, DetectionPredictor):  # a segmentation study's masks: one PNG per image
        from distrain.serving.masks import predict_mask_folder

        count = predict_mask_folder(predictor, folder, Path(args.out))
        print(f"distrain: wrote {count} masks to {args.out}/ ({predictor.meta['ensemble']})")
        return 0
    out = predict_detection_folder(predictor, folder)
    atomic_write_json(Path(args.out), out)
    words = sum(len(e["words"]) for e in out["images"])
    print(f"distrain: wrote {words} text boxes of {len(out['images'])} images to {args.out} (>= {predictor.k} of "
          f"{len(predictor.models)} fold models of {predictor.column})")  # fmt: skip
    return 0


def _adversarial(args) -> int:
    """`distrain adversarial`: the study's CV images against its holdout or a folder; report, review and MLflow."""
    from distrain.ensembles.report import Report
    from distrain.orchestration import phases
    from distrain.serving.adversarial import run_adversarial

    run_dir = Path(args.run_dir)
    cfg, report = phases.load_run_dir(run_dir), Report.read(run_dir)
    against = None if args.against == "test" else Path(args.against)
    if report is None or not (run_dir / "ensemble" / "model" / "meta.json").is_file():
        raise BadInput(f"{run_dir}: no report.json and ensemble model (the study has not aggregated with "
                       f"ensemble.register_model)")  # fmt: skip
    if against is not None and not against.is_dir():
        raise BadInput(f"adversarial: not a folder: {against}")
    route_library_output(run_dir)
    result = run_adversarial(run_dir, Path(cfg.data.root), report.ensemble_details["best_single_column"], against)
    name = "adversarial-test.json" if against is None else f"adversarial-{against.name}.json"
    path = run_dir / "ensemble" / name
    atomic_write_json(path, result)
    tracker = phases.open_tracker(cfg, run_dir)
    tracker.log_metrics(tracker.parent_run_id, {f"adversarial_auc_{path.stem.split('-', 1)[1]}": result["auc"]}, 0)
    tracker.log_artifact(tracker.parent_run_id, path, "review")
    print(f"distrain: adversarial validation, CV ({result['n_cv']}) vs {result['against']} ({result['n_other']}), "
          f"embeddings of {result['embedding']}: ROC AUC {result['auc']:.4f} (per-fold std {result['auc_fold_std']:.4f}"
          f"; 0.5: alike, 1: told apart)")  # fmt: skip
    print("CV images most unlike it: " + ", ".join(f"{r['sample_id']} ({r['p_other']:.3f})"
                                                 for r in result["most_unlike_other"][:5]))  # fmt: skip
    print(f"distrain: wrote {path}")
    return 0


def _distill(args) -> int:
    """`distrain distill`: the study's ensemble distilled into one student network (`orchestration.distill`)."""
    from distrain.orchestration.distill import DistillRequest, run_distill

    try:
        seeds = tuple(int(x) for x in args.seeds.split(",")) if args.seeds else ()
    except ValueError:
        raise BadInput(f"--seeds {args.seeds}: integers separated by commas, e.g. 42,43") from None
    request = DistillRequest(Path(args.run_dir), args.student, args.temperature, args.alpha, seeds,
                             not args.no_hard_baseline, args.prepare, tuple(args.overrides))  # fmt: skip
    return run_distill(request)


def _pseudo(args) -> int:
    """`distrain pseudo-label`: a second round on unlabelled images (`orchestration.pseudo`)."""
    from distrain.orchestration.pseudo import PseudoRequest, run_pseudo

    request = PseudoRequest(Path(args.run_dir), args.unlabelled, args.threshold, args.min_votes, args.soft,
                            args.prepare, tuple(args.overrides))  # fmt: skip
    return run_pseudo(request)


def _k8s(args) -> int:
    from distrain.config import load_config
    from distrain.deploy.k8s import MIN_KUBERNETES, RenderOptions, dns_name, render

    cfg = load_config(args.config, args.overrides)
    opts = RenderOptions(
        workers=args.workers, gpus_per_worker=args.gpus_per_worker, mode=args.mode,
        nodes_per_worker=args.nodes_per_worker, image=args.image or RenderOptions.image,
        mlflow_image=args.mlflow_image or RenderOptions.mlflow_image, namespace=args.namespace,
        storage_class=args.storage_class, runs_storage=args.runs_storage, cpu=args.cpu, memory=args.memory,
        shm=args.shm, rdma=args.rdma_resource,
        node_selector=dict(_pair(s, "=", "--node-selector") for s in args.node_selector),
        tolerations=[_toleration(t) for t in args.toleration], priority_class=args.priority_class,
        queue=args.queue, deadline_s=int(args.deadline_hours * 3600), ttl_s=int(args.ttl_hours * 3600),
        data_root=args.data_root, external_db=args.external_db, mlflow_artifacts=args.mlflow_artifacts,
    )  # fmt: skip
    out = Path(args.out)
    files = render(cfg, opts, out)
    overlay = next(p.parent for p in files if p.name == "workers.yaml")
    print(f"distrain: wrote {len(files)} files under {out} (Kubernetes >= {MIN_KUBERNETES})")
    if not opts.storage_class:
        print("distrain: no --storage-class: the cluster's default class must offer ReadWriteMany for distrain-runs")
    print(f"  kubectl create secret generic distrain-mlflow-db --from-literal=password=$(openssl rand -hex 16)"
          f"\n  kubectl apply -k {overlay}\n  kubectl get {'jobset' if opts.mode == 'multinode' else 'job'} "
          f"distrain-{dns_name(cfg.experiment)}")  # fmt: skip
    return 0


def _pair(text: str, sep: str, flag: str) -> tuple[str, str]:
    key, found, value = text.partition(sep)
    if not found or not key:
        raise BadInput(f"{flag} {text!r}: expected key{sep}value")
    return key, value


def _toleration(text: str) -> dict:
    """`key[=value]:Effect` as a toleration (Exists without a value)."""
    key_value, effect = _pair(text, ":", "--toleration")
    if effect not in ("NoSchedule", "PreferNoSchedule", "NoExecute"):
        raise BadInput(f"--toleration {text!r}: the effect is NoSchedule, PreferNoSchedule or NoExecute")
    key, _, value = key_value.partition("=")
    if value:
        return {"key": key, "operator": "Equal", "value": value, "effect": effect}
    return {"key": key, "operator": "Exists", "effect": effect}


def _schedule(args) -> int:
    import os

    from distrain.config import load_config
    from distrain.orchestration.local import Nodes, check_gpus, run_local_workers

    load_config(args.config, args.overrides)  # a bad config is one line here, not once per worker + a traceback
    run_args = (
        (["--config", args.config] if args.config else [])
        + (["--shard", args.shard] if args.shard else [])
        + list(args.overrides)
    )
    rank = args.machine_rank
    if rank is None:  # a multi-node worker's pods are an Indexed Job: the index is the node's rank
        rank = int(os.environ.get("JOB_COMPLETION_INDEX", "0")) if args.num_machines > 1 else 0
    nodes = Nodes(args.num_machines, rank, args.main_process_ip, args.main_process_port)
    procs = args.procs_per_worker
    if args.gpus_per_worker:
        if procs not in (1, args.gpus_per_worker):
            raise BadInput("--gpus-per-worker sets the processes per worker: leave --procs-per-worker out")
        check_gpus(args.workers, args.gpus_per_worker)
        procs = args.gpus_per_worker
    return run_local_workers(args.workers, procs, run_args, nodes)


def _add_data_parser(sub) -> None:
    """`distrain data digits|pack|synth-text|synth-shapes` and its options."""
    d = sub.add_parser("data", help="write WebDataset shards")
    d.add_argument("what", choices=["digits", "pack", "synth-text", "synth-shapes"])
    d.add_argument("--out", default="data/digits", help="output directory (must not exist)")
    d.add_argument("--images", help="pack: folder with one subfolder per class; with --npz, the image array's key; "
                   "synth-text / synth-shapes: how many images")  # fmt: skip
    d.add_argument("--seed", type=int, default=0, help="synth-*: image i depends only on (seed, i)")
    d.add_argument("--csv", help="pack: CSV with columns path,label[,group]")
    d.add_argument("--masks", metavar="DIR", help="pack: class-id mask PNGs named as the --images DIR images")
    d.add_argument("--groups", metavar="CSV", help="pack --masks: image,group rows (a group shares a fold)")
    d.add_argument("--detection", metavar="ANN.json",
                   help="pack: text polygons of the --images DIR images (ICDAR-style JSON)")  # fmt: skip
    d.add_argument("--npz", help="pack: arrays of images (N x H x W[ x C]) and labels, e.g. train.npz")
    d.add_argument("--test", help="pack --npz: the holdout's npz (same keys); else --test-fraction of the first")
    d.add_argument("--label", default="y", help="pack --npz: the label array's key (N non-negative integers)")
    d.add_argument("--group", help="pack --npz: the group array's key (samples of a group share a fold)")
    d.add_argument("--multilabel", action="store_true", dest="label_sets",
                   help="pack --csv: each label cell lists a sample's labels, separated by spaces, | or ;")  # fmt: skip
    d.add_argument("--task", choices=list(TASKS), default=DEFAULT_TASK,
                   help="digits: label the digit, 'is it an 8?' or the digit's properties")  # fmt: skip
    d.add_argument("--channels", choices=["auto", "1", "3"], default="auto",
                   help="pack: 1 (grayscale), 3 (RGB), or auto: 1 when every image is grayscale")  # fmt: skip
    d.add_argument("--test-fraction", type=float, default=0.2, help="fixed stratified holdout kept out of CV")
    d.add_argument("--shard-mb", type=float, default=256.0, help="pack: megabytes per tar shard at most")
    d.add_argument(
        "--min-shards",
        type=int,
        default=32,
        help="pack: smaller shards when the split would give fewer (every rank x worker reads its own)",
    )
    d.add_argument(
        "--shard-size",
        type=int,
        default=None,
        help="samples per tar shard at most (digits: 64; pack: no limit but --shard-mb)",
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="distrain", description="K-fold x seed x backbone training, ensembled, in MLflow")
    sub = p.add_subparsers(dest="command", required=True)

    _add_data_parser(sub)

    t = sub.add_parser("train", help="run the main job (as distrain/run.py)")
    t.add_argument("args", nargs=argparse.REMAINDER)

    for name, helptext in (
        ("aggregate", "report + voting + stacking on a run directory, without training"),
        ("ensemble", "the same as aggregate (older name)"),
    ):
        e = sub.add_parser(name, help=helptext)
        e.add_argument("--run-dir", required=True, action="append",
                       help="a run directory; give it again for one ensemble across run directories that share "
                            "a fold manifest")  # fmt: skip
        e.add_argument("--out", default="", help="several --run-dir: where the ensemble is written "
                                                 "(default <run root>/<a>+<b>)")  # fmt: skip
        e.add_argument(
            "--allow-partial",
            action="store_true",
            help="leave out (model, seed) columns with missing OOF rows instead of failing",
        )
        e.add_argument("overrides", nargs="*", help="ensemble.* overrides, saved in the run directory's config, "
                                                    "e.g. ensemble.members.exclude=[convnext_tiny-s2]")  # fmt: skip

    _run_dir_parsers(sub)

    r = sub.add_parser("predict", help="predict images of any size with a run's ensemble; writes a CSV")
    r.add_argument("--run-dir", required=True)
    r.add_argument("--images", help="a folder of images (searched recursively)")
    r.add_argument("--shards", help="a folder of .tar shards (as `distrain data pack` writes)")
    r.add_argument("--second-images", help="pair tasks: the folder of each pair's second image, matched by file name")
    r.add_argument("--out", required=True, help="CSV: image, prediction, p_<class> ...")
    r.add_argument("--model-uri", default="", help="a registered model, e.g. models:/distrain-digits/2 (default: "
                                                    "the run directory's own ensemble files)")  # fmt: skip

    a = sub.add_parser("adversarial", help="adversarial validation: can the study's embeddings tell CV images from "
                                          "the holdout (or a folder)?")  # fmt: skip
    a.add_argument("--run-dir", required=True)
    a.add_argument("--against", default="test", help="'test' (the holdout) or a folder of images")

    _distill_parser(sub)
    _pseudo_parser(sub)

    sw = sub.add_parser("sweep", help="an Optuna sweep worker: trials claimed from the sweep's ledger")
    sw.add_argument("--config", default=None)
    sw.add_argument("--space", required=True, help="search space YAML: config key -> {low, high, log} or {choices}")
    sw.add_argument("--trials", type=int, required=True, help="trials in the sweep (give every worker the same)")
    sw.add_argument("--write-best", default="", help="when the sweep is done, write its best config here")
    sw.add_argument("overrides", nargs="*", help="a.b=value overrides of the base config")

    _k8s_parser(sub)

    _schedule_parser(sub)
    return p


def _distill_parser(sub) -> None:
    d = sub.add_parser("distill", help="distil a finished study's ensemble into one student network, trained on "
                                       "the ensemble's out-of-fold probabilities")  # fmt: skip
    d.add_argument("--run-dir", required=True, help="the teacher study's run directory")
    d.add_argument("--student", required=True, help="the student's timm model name (or package.module:function)")
    d.add_argument("--temperature", type=float, default=3.0, help="softening of the soft-target loss (default 3)")
    d.add_argument("--alpha", type=float, default=0.7, help="weight of the soft-target loss; 1 - alpha: hard labels")
    d.add_argument("--seeds", default="", help="the student's seeds, comma-separated (default: the study's first)")
    d.add_argument("--no-hard-baseline", action="store_true", help="skip the hard-label student")
    d.add_argument(
        "--prepare",
        action="store_true",
        help="write the soft targets and the student studies' configs "
        "and stop (train them with any launcher, then run again)",
    )
    d.add_argument("overrides", nargs="*", help="a.b=value overrides of the student studies, e.g. train.epochs=20")


def _pseudo_parser(sub) -> None:
    u = sub.add_parser("pseudo-label", help="a second round of a finished study that also trains on unlabelled "
                                            "images labelled by its fold models")  # fmt: skip
    u.add_argument("--run-dir", required=True, help="the finished study's run directory")
    u.add_argument("--unlabelled", default="", help="a folder of .tar shards (default: the study's data.unlabelled)")
    u.add_argument("--threshold", type=float, default=0.9, help="least probability of the class (default 0.9)")
    u.add_argument("--min-votes", type=int, default=0, help="least columns deciding the class (default 0)")
    u.add_argument("--soft", action="store_true", help="the images learn their fold ensemble's probabilities")
    u.add_argument("--prepare", action="store_true", help="write the labels and the round's config and stop")
    u.add_argument("overrides", nargs="*", help="a.b=value overrides of the round's study")


def _run_dir_parsers(sub) -> None:
    """The commands that look after one run directory: status, retry, sync."""
    s = sub.add_parser("status", help="pending / running / done / failed jobs of a run directory")
    s.add_argument("--run-dir", required=True)
    s.add_argument("--json", action="store_true")

    rt = sub.add_parser("retry", help="make jobs failed for good pending again (once their cause is fixed)")
    rt.add_argument("--run-dir", required=True)
    rt.add_argument("--job", action="append", default=[], help="only this job (repeatable; default: every failed one)")

    y = sub.add_parser("sync", help="send tracking calls buffered while MLflow was unreachable")
    y.add_argument("--run-dir", required=True)


def _schedule_parser(sub) -> None:
    w = sub.add_parser("schedule", help="start W accelerate-launch workers on this node, sharing one ledger")
    w.add_argument("--config", default=None)
    w.add_argument("--workers", type=int, default=1, help="process groups on this node")
    w.add_argument("--procs-per-worker", type=int, default=1, help="processes (GPUs) per worker")
    w.add_argument("--gpus-per-worker", type=int, default=0,
                   help="one process per GPU, and exit 4 (not train on CPU) when fewer GPUs are visible")  # fmt: skip
    w.add_argument("--shard", default=None, help="static mode for all of them: i/n")
    w.add_argument("--num-machines", type=int, default=1, help="one worker's DDP group spans this many nodes")
    w.add_argument("--machine-rank", type=int, default=None, help="this node's rank (default: $JOB_COMPLETION_INDEX)")
    w.add_argument("--main-process-ip", default="", help="host name of the node with rank 0 (several machines)")
    w.add_argument("--main-process-port", type=int, default=29500)
    w.add_argument("overrides", nargs="*", help="a.b=value overrides passed to every worker")


def _k8s_parser(sub) -> None:
    k = sub.add_parser("k8s", help="Kubernetes manifests from a config").add_subparsers(dest="k8s_command",
                                                                                      required=True)  # fmt: skip
    r = k.add_parser("render", help="a kustomize base + an overlay for the experiment")
    r.add_argument("--config", default=None)
    r.add_argument("--workers", type=int, required=True, help="worker pods (indexed: completions), at most the jobs")
    r.add_argument("--gpus-per-worker", type=int, default=0, help="0: CPU pods")
    r.add_argument("--mode", default="indexed", help="indexed | queue | multinode (a JobSet)")
    r.add_argument("--nodes-per-worker", type=int, default=2, help="multinode: pods in one DDP group")
    r.add_argument("--image", default="", help="the worker image, repo:tag or repo@sha256:... (set once, kustomize)")
    r.add_argument("--mlflow-image", default="", help="the MLflow server image (docker/mlflow.Dockerfile)")
    r.add_argument("--namespace", default="")
    r.add_argument("--storage-class", default="", help="a ReadWriteMany class for the run volume")
    r.add_argument("--runs-storage", default="200Gi")
    r.add_argument("--cpu", default="4", help="CPU request per worker pod")
    r.add_argument("--memory", default="", help="memory request and limit per worker pod (default: 8Gi + 12Gi per "
                   "GPU + the shm)")  # fmt: skip
    r.add_argument("--shm", default="", help="/dev/shm of a worker pod (default: 4Gi per GPU, 2Gi without)")
    r.add_argument("--rdma-resource", default="", help="an RDMA device resource for multi-node NCCL, e.g. rdma/ib "
                   "(adds IPC_LOCK: the pod leaves the restricted Pod Security level)")  # fmt: skip
    r.add_argument("--node-selector", action="append", default=[], help="key=value (repeatable)")
    r.add_argument("--toleration", action="append", default=[],
                   help="key[=value]:Effect (repeatable; default with GPUs: nvidia.com/gpu:NoSchedule)")  # fmt: skip
    r.add_argument("--priority-class", default="")
    r.add_argument("--queue", default="", help="a Kueue LocalQueue name (label kueue.x-k8s.io/queue-name)")
    r.add_argument("--deadline-hours", type=float, default=168, help="activeDeadlineSeconds of the worker Job")
    r.add_argument("--ttl-hours", type=float, default=72, help="ttlSecondsAfterFinished")
    r.add_argument("--data-root", default="", help="data.root in the pods (default /runs/data/<name>)")
    r.add_argument("--external-db", action="store_true",
                   help="no PostgreSQL: MLflow's store URL from Secret distrain-mlflow-db, key uri")  # fmt: skip
    r.add_argument("--mlflow-artifacts", default="", help="e.g. s3://bucket/mlflow (default: a volume)")
    r.add_argument("--out", required=True)
    r.add_argument("overrides", nargs="*", help="a.b=value overrides of the config")


def main(argv: list[str] | None = None) -> int:
    from distrain import interrupts

    interrupts.install()  # before any heavy import: SIGTERM from here on is one line and exit 75
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:
        from distrain.run import main as run_main

        return run_main(argv[1:])
    args = build_parser().parse_args(argv)
    commands = {
        "data": _data,
        "status": _status,
        "retry": _retry,
        "ensemble": _aggregate,
        "aggregate": _aggregate,
        "sync": _sync,
        "schedule": _schedule,
        "sweep": _sweep,
        "predict": _predict,
        "adversarial": _adversarial,
        "distill": _distill,
        "pseudo-label": _pseudo,
        "k8s": _k8s,
    }
    try:
        return commands[args.command](args)
    except BadInput as e:
        return refuse(e)
    except OSError as e:  # disk full or read-only where a library wrote
        if storage_error(e) is None:
            raise
        return refuse(storage_error(e))
    except Preempted as e:  # a deferred stop (sync): its message says where it stopped
        return exit_with_line(f"distrain: {e}", e.exit_code)
    except interrupts.Terminated:
        return interrupts.exit_stopped(f"during `distrain {args.command}`; its files are written whole or not at all")
    finally:
        interrupts.disarm()


if __name__ == "__main__":
    sys.exit(main())
