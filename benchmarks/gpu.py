"""The GPU checks of `../shared/GPU.md` in one call: (a) distrain's training step against a bare PyTorch loop on the
same model and batch, per precision variant; (b) one end-to-end job on generated JPEGs, its samples/s against (a)'s
step rate (the input-bound fraction).

(a) resnet50, 224 px, batch 128, synthetic data on the device: distrain's own step (`distributed.wrap` ->
`Trainable.micro_step`, with its loss, clipping and AdamW) and a hand-written loop doing the same work, run
alternately; variants fp32, fp16, bf16, bf16 + channels-last, bf16 + gradient checkpointing (peak memory), bf16 +
compile (last: its first steps compile). Images/s, ms per step, peak GiB, ratio distrain / bare.
(b) N JPEGs (~500x400, drawn with all cores), packed as distrain packs a folder, one job of the model for 3 epochs
with the fine-tune config's augmentation and `data.num_workers: -1`: samples/s of the last epoch / (a)'s bf16 rate.

Each phase has a time limit (a variant that would start past it is recorded as skipped) and every result is
appended to --out as a JSON line as soon as it is measured, so a run cut short keeps what it measured. The last
printed line is one JSON object with every figure.

    python benchmarks/gpu.py [--out gpu-results.jsonl] [--minutes-a 4] [--minutes-b 3]
    python benchmarks/gpu.py --smoke     # the same code on the CPU in seconds (CI runs it)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate.state import AcceleratorState, GradientState
from PIL import Image

from distrain.config import TrainConfig, load_config
from distrain.distributed import runtime
from distrain.distributed.wrap import wrap
from distrain.training.models import create_model
from distrain.training.optim import create_optimizer


@dataclass(frozen=True)
class Setup:
    model: str
    image_size: int
    batch: int
    warmup: int
    steps: int
    variants: tuple[str, ...]
    jpegs: int
    jpeg_size: tuple[int, int]
    epochs: int


FULL = Setup("resnet50", 224, 128, 10, 40, ("fp32", "fp16", "bf16", "bf16+channels_last", "bf16+grad_ckpt",
                                            "bf16+compile"), 6000, (500, 400), 3)  # fmt: skip
FINETUNE = Path(__file__).resolve().parents[1] / "configs" / "finetune.yaml"
SMOKE = Setup("test_resnet", 32, 8, 2, 4, ("fp32", "bf16", "bf16+grad_ckpt"), 120, (64, 48), 1)


class Results:
    """Figures appended to a JSON-lines file as they come (a run cut short keeps them) and kept for the summary."""

    def __init__(self, path: Path):
        self.path, self.rows = path, []

    def add(self, row: dict) -> None:
        self.rows.append(row)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def variant_config(variant: str) -> TrainConfig:
    precision = variant.split("+")[0]
    return TrainConfig(precision="no" if precision == "fp32" else precision, compile="compile" in variant,
                       channels_last="channels_last" in variant, progress=False)  # fmt: skip


def distrain_step(setup: Setup, variant: str, images: torch.Tensor, labels: torch.Tensor) -> dict:
    """Images/s of distrain's step: `wrap` (checkpointing, compile, DDP through accelerate) and `micro_step`."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    train = variant_config(variant)
    accelerator = runtime.create_accelerator(train)
    torch.manual_seed(0)
    model = create_model(setup.model, num_classes=1000, in_chans=3).to(accelerator.device)
    optimizer = create_optimizer(model, load_config(None).optim, fused=accelerator.device.type == "cuda")
    trainable = wrap(accelerator, model, optimizer, train, grad_checkpointing="grad_ckpt" in variant)
    memory_format = torch.channels_last if train.channels_last and images.is_cuda else torch.contiguous_format
    images = images.contiguous(memory_format=memory_format)
    criterion = torch.nn.CrossEntropyLoss()
    return timed(setup, lambda: trainable.micro_step(images, labels, criterion))


def bare_step(setup: Setup, variant: str, images: torch.Tensor, labels: torch.Tensor) -> dict:
    """Images/s of a hand-written loop doing the same work: autocast, loss, backward, clip, AdamW."""
    precision = variant.split("+")[0]
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
    torch.manual_seed(0)
    model = create_model(setup.model, num_classes=1000, in_chans=3).to(images.device)
    if "grad_ckpt" in variant:
        model.set_grad_checkpointing(True)
    if "channels_last" in variant and images.is_cuda:
        model, images = (
            model.to(memory_format=torch.channels_last),
            images.contiguous(memory_format=torch.channels_last),
        )
    forward = torch.compile(model) if "compile" in variant else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, fused=images.is_cuda)
    scaler = torch.amp.GradScaler(enabled=precision == "fp16")

    def step() -> None:
        with torch.autocast(images.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = forward(images)
        loss = F.cross_entropy(logits.float(), labels)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    return timed(setup, step)


def release_memory() -> None:
    """Drop the last variant's models and optimizer states before the next one measures its peak."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def timed(setup: Setup, step) -> dict:
    for _ in range(setup.warmup):
        step()
    synchronize()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(setup.steps):
        step()
    synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    return {"images_per_s": setup.batch * setup.steps / seconds, "ms_per_step": 1000 * seconds / setup.steps,
            "peak_gib": peak}  # fmt: skip


def part_a(setup: Setup, results: Results, limit_s: float) -> dict[str, float]:
    """Each variant, bare then distrain, on one synthetic batch on the device; returns distrain's images/s."""
    dev, start, rates = device(), time.monotonic(), {}
    images = torch.randn(setup.batch, 3, setup.image_size, setup.image_size, device=dev)
    labels = torch.randint(0, 1000, (setup.batch,), device=dev)
    for variant in setup.variants:
        if time.monotonic() - start > limit_s:
            results.add({"phase": "a", "variant": variant, "skipped": f"phase a past its {limit_s:.0f} s"})
            continue
        if variant.startswith("fp16") and dev.type != "cuda":
            results.add({"phase": "a", "variant": variant, "skipped": "fp16 needs a CUDA GPU"})
            continue
        try:
            bare = bare_step(setup, variant, images, labels)
            ours = distrain_step(setup, variant, images, labels)
        except Exception as e:  # a variant that fails is a finding to report, not a reason to lose the others
            results.add({"phase": "a", "variant": variant, "error": f"{type(e).__name__}: {str(e)[:300]}"})
            continue
        rates[variant] = ours["images_per_s"]
        release_memory()
        results.add({"phase": "a", "variant": variant, "bare": bare, "distrain": ours,
                     "ratio": ours["images_per_s"] / bare["images_per_s"]})  # fmt: skip
    return rates


def _draw_jpeg(args: tuple[Path, int, tuple[int, int]]) -> None:
    path, i, (w, h) = args
    rng = np.random.default_rng(i)
    y, x = np.mgrid[0:h, 0:w]
    label = i % 10
    base = ((x * (label + 1) + y * (10 - label)) % 256)[..., None] + rng.integers(0, 40, (h, w, 3))
    Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)).save(path, quality=90)


def make_jpegs(root: Path, n: int, size: tuple[int, int]) -> Path:
    """`n` JPEGs in 10 class folders, drawn with every core."""
    folder = root / "images"
    for c in range(10):
        (folder / str(c)).mkdir(parents=True, exist_ok=True)
    jobs = [(folder / str(i % 10) / f"{i:06d}.jpg", i, size) for i in range(n)]
    with Pool(os.cpu_count()) as pool:
        pool.map(_draw_jpeg, jobs, chunksize=64)
    return folder


def part_b(setup: Setup, results: Results, step_rate: float | None) -> None:
    """One job on packed JPEGs with the fine-tune augmentation: the last epoch's samples/s against the step rate."""
    from distrain.data.index import read_index
    from distrain.data.pack import samples_from_folder, write_dataset
    from distrain.study.folds import build_fold_manifest
    from distrain.study.plan import Job
    from distrain.training.loop import fit_job

    with tempfile.TemporaryDirectory() as tmp:
        start = time.monotonic()
        samples, classes = samples_from_folder(make_jpegs(Path(tmp), setup.jpegs, setup.jpeg_size))
        index = write_dataset(samples, Path(tmp) / "packed", classes=classes)
        prepared_s = time.monotonic() - start
        precision = "bf16" if torch.cuda.is_available() else "no"
        cfg = load_config(FINETUNE, [f"data.root={index.root}", f"model.names=[{setup.model}]",
                          "model.pretrained=false", "model.drop_path_rate=0", f"data.image_size={setup.image_size}",
                          f"train.batch_size={setup.batch}", f"train.epochs={setup.epochs}",
                          f"train.precision={precision}", "train.progress=false"])  # fmt: skip
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        accelerator = runtime.create_accelerator(cfg.train)
        index = read_index(index.root)
        cv, labels = index.split_ids("cv"), index.labels_of("cv")
        manifest = build_fold_manifest(cv, [labels[s] for s in cv], cfg.cv.folds, 0)
        result = fit_job(Job(setup.model, 42, 0), cfg, index, manifest.fold_of_sample, accelerator)
        rate = result.history[-1]["samples_per_s"]
        results.add({"phase": "b", "jpegs": setup.jpegs, "prepare_s": prepared_s, "samples_per_s": rate,
                     "input_bound_fraction": rate / step_rate if step_rate else None})  # fmt: skip


def environment() -> dict:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"device": gpu or "cpu", "torch": torch.__version__, "cuda": torch.version.cuda, "cpus": os.cpu_count()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU: the same code in seconds")
    p.add_argument("--out", default="gpu-results.jsonl", help="JSON lines, appended as results come")
    p.add_argument("--minutes-a", type=float, default=4.0, help="time limit of part a (training step)")
    p.add_argument("--skip-b", action="store_true", help="only part a")
    args = p.parse_args(argv)
    setup = SMOKE if args.smoke else FULL
    results = Results(Path(args.out))
    results.add({"phase": "environment", **environment(), "smoke": args.smoke})
    rates = part_a(setup, results, 60 * args.minutes_a)
    if not args.skip_b:
        part_b(setup, results, rates.get("bf16") or rates.get("fp32"))
    summary = {"environment": results.rows[0]}
    for row in results.rows[1:]:
        key = f"{row['phase']}:{row.get('variant', 'e2e')}"
        summary[key] = {k: v for k, v in row.items() if k not in ("phase", "variant")}
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
