"""distrain's training engine vs a bare, hand-written PyTorch loop: same timm model, same data, one process.

Both train fold 0 of the digits CV pool with AdamW + warmup/cosine, gradient clipping at 1.0, fp32,
batch 64, no augmentation, and evaluate the validation fold after every epoch keeping the best weights.
The bare loop holds the decoded images in memory as one tensor and indexes batches from it; distrain
reads its WebDataset shards through `fit_job` in the same process (data.num_workers=0; the digits fit in
data.cache_mb, so each image is decoded once per process and kept).

Printed: training throughput (samples/s over the training steps, first epoch excluded as warm-up) and
whole-job wall time, each as a ratio distrain / bare (target for throughput: >= 0.95). Runs alternate
bare, distrain, bare, distrain, ... and the median of each is taken. Last line: one JSON object.

    python benchmarks/overhead.py [--model test_resnet] [--epochs 4] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import webdataset as wds
from PIL import Image

from distrain.config import load_config
from distrain.data.index import read_index
from distrain.data.pack import write_digits
from distrain.distributed import runtime
from distrain.study.folds import build_fold_manifest
from distrain.study.plan import Job
from distrain.training.loop import fit_job
from distrain.training.models import create_model
from distrain.training.optim import create_optimizer, create_scheduler


def load_split(urls, keep, image_size):
    """Plain webdataset read of the same shards into memory: uint8 images [N,1,S,S] and labels."""
    images, labels = [], []
    for sample in wds.WebDataset(list(urls), shardshuffle=False, empty_check=False):
        if sample["__key__"] in keep:
            img = (
                Image.open(__import__("io").BytesIO(sample["png"]))
                .convert("L")
                .resize((image_size, image_size), Image.BILINEAR)
            )
            images.append(torch.from_numpy(np.asarray(img).copy())[None])
            labels.append(int(sample["cls"]))
    return torch.stack(images), torch.tensor(labels)


def bare_job(cfg, train, val, seed):
    """A hand-written loop doing the same work as fit_job."""
    torch.manual_seed(seed)
    tc = cfg.train
    model = create_model(cfg.model.names[0], num_classes=10, in_chans=1)
    opt = create_optimizer(model, cfg.optim)
    steps = len(train[0]) // tc.batch_size
    sched = create_scheduler(opt, cfg.optim, total_steps=steps * tc.epochs, steps_per_epoch=steps)
    rates, best, _best_state = [], -1.0, None
    start_job = time.perf_counter()
    for _epoch in range(tc.epochs):
        model.train()
        perm = torch.randperm(len(train[0]))
        t0 = time.perf_counter()
        for i in range(steps):
            idx = perm[i * tc.batch_size : (i + 1) * tc.batch_size]
            x = train[0][idx].float().div_(127.5).sub_(1.0)
            loss = F.cross_entropy(model(x), train[1][idx])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
        rates.append(steps * tc.batch_size / (time.perf_counter() - t0))
        model.eval()
        with torch.no_grad():
            probs = torch.cat(
                [
                    torch.softmax(model(val[0][i : i + 128].float().div(127.5).sub(1.0)), 1)
                    for i in range(0, len(val[0]), 128)
                ]
            )
        acc = float((probs.argmax(1) == val[1]).float().mean())
        if acc > best:
            best, _best_state = acc, {k: v.detach().clone() for k, v in model.state_dict().items()}  # as fit_job does
    return statistics.median(rates[1:]), time.perf_counter() - start_job, best


def distrain_job(cfg, index, fold_of_sample, accelerator, seed):
    start = time.perf_counter()
    result = fit_job(Job(cfg.model.names[0], seed, 0), cfg, index, fold_of_sample, accelerator)
    seconds = time.perf_counter() - start
    return statistics.median(h["samples_per_s"] for h in result.history[1:]), seconds, result.val_score


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="test_resnet")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "digits"
        write_digits(root)
        cfg = load_config(
            None,
            [
                f"data.root={root}",
                f"model.names=[{args.model}]",
                f"train.epochs={args.epochs}",
                "augment.enabled=false",
                "data.num_workers=0",
                "data.interpolation=bilinear",  # the bare loop's preprocessing: bilinear, no crop, [-1, 1]
                "data.crop_pct=1.0",
                "data.mean=[0.5]",
                "data.std=[0.5]",
                "train.precision=no",
                "train.progress=false",
            ],
        )
        index = read_index(root)
        cv = index.split_ids("cv")
        labels = index.labels_of("cv")
        fold_of_sample = build_fold_manifest(cv, [labels[s] for s in cv], 5, 0).fold_of_sample
        val_ids = {s for s in cv if fold_of_sample[s] == 0}
        train = load_split(index.urls("cv"), set(cv) - val_ids, cfg.data.image_size)
        val = load_split(index.urls("cv"), val_ids, cfg.data.image_size)
        accelerator = runtime.create_accelerator(cfg.train)
        distrain_job(cfg, index, fold_of_sample, accelerator, seed=0)  # warm-up: fills the decode cache
        bare, ours = [], []
        for r in range(args.repeats):
            bare.append(bare_job(cfg, train, val, seed=r))
            ours.append(distrain_job(cfg, index, fold_of_sample, accelerator, seed=r))
            print(
                f"repeat {r}: bare {bare[-1][0]:.0f} samples/s, {bare[-1][1]:.2f} s/job (val {bare[-1][2]:.4f}); "
                f"distrain {ours[-1][0]:.0f} samples/s, {ours[-1][1]:.2f} s/job (val {ours[-1][2]:.4f})",
                flush=True,
            )
    b_rate, d_rate = statistics.median(x[0] for x in bare), statistics.median(x[0] for x in ours)
    b_time, d_time = statistics.median(x[1] for x in bare), statistics.median(x[1] for x in ours)
    figures = {
        "benchmark": "overhead",
        "model": args.model,
        "image_size": cfg.data.image_size,
        "batch_size": cfg.train.batch_size,
        "epochs": args.epochs,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "device": "cpu",
        "bare_samples_per_s": round(b_rate, 1),
        "distrain_samples_per_s": round(d_rate, 1),
        "throughput_ratio": round(d_rate / b_rate, 3),
        "bare_job_s": round(b_time, 2),
        "distrain_job_s": round(d_time, 2),
        "job_time_ratio": round(d_time / b_time, 3),
    }
    print(
        f"throughput distrain / bare = {figures['throughput_ratio']:.3f} (target >= 0.95); "
        f"job wall time distrain / bare = {figures['job_time_ratio']:.3f}"
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
