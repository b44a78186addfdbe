"""Training input pipeline, side by side: distrain's loader against timm's own pipeline over the same shards.

~2,000 JPEGs of varied size (400-600 x 300-450 px) are packed with `distrain data pack`; a fold's training
samples (4 of 5) are read at 224 px with timm-style augmentation (random-resized crop, horizontal flip,
RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25) by:

- distrain: `train_loader` + `train_decoder` (timm's transform per sample in the workers, uint8 out), then
  normalisation and random erasing per batch (on the device in training; here on the CPU, and timed);
- distrain_loader: the same loader alone, what its workers deliver (augmented uint8 batches);
- timm: webdataset over the same shards (out-of-fold samples dropped before decoding) -> PIL decode ->
  `timm.data.create_transform(is_training=True)` (float, normalised, erased in the workers) -> batches;
- decode: distrain's reader with decode-and-resize only (shorter side to 224 with the same bicubic filter,
  centre crop, no augmentation, uint8 out), the bound of an epoch that must decode and resize every image.

ratio_vs_timm compares distrain with its per-batch device work charged on the CPU against timm (both deliver
normalised, erased floats); ratio_vs_decode compares distrain_loader with decode (both deliver uint8).

Same workers, same batch size, interleaved repeats, medians of steady-state images/s (after the first
batch). Then `rss_growth`: the peak RSS of a process running one training pass and one evaluation pass
(2 workers) over 4x the images (the same files linked under new names) divided by that over 1x.

    python benchmarks/loader.py [--images 2000] [--workers 0 2] [--repeats 3] [--workdir DIR]

Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.pack import make_images  # noqa: E402
from distrain.config import AugmentConfig  # noqa: E402
from distrain.data import loaders  # noqa: E402
from distrain.data import pack as packing  # noqa: E402
from distrain.data.augment import BatchAugment  # noqa: E402
from distrain.data.index import read_index  # noqa: E402
from distrain.data.transforms import ImageTransform  # noqa: E402

SIZE, BATCH, BUFFER = 224, 64, 1000
AUGMENT = AugmentConfig(scale=[0.08, 1.0], hflip=0.5, auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25)
TRANSFORM = ImageTransform(SIZE, 3, interpolation="bicubic", crop_pct=0.875, mean=(0.485, 0.456, 0.406),
                           std=(0.229, 0.224, 0.225))  # fmt: skip


def prepare(work: Path, images: int, factor: int) -> Path:
    """Packed shards of `images` x `factor` JPEGs (the 1x files hard-linked under new names for factor > 1)."""
    src, packed = work / "jpegs", work / f"packed-x{factor}"
    if not src.is_dir() or len(list(src.rglob("*.jpg"))) != images:
        make_images(src, images, seed=0)
    if (packed / "index.json").is_file():
        return packed
    folder = src
    if factor > 1:
        folder = work / f"jpegs-x{factor}"
        for path in sorted(src.rglob("*.jpg")):
            for k in range(factor):
                link = folder / path.parent.name / f"{path.stem}-{k}.jpg"
                link.parent.mkdir(parents=True, exist_ok=True)
                if not link.exists():
                    os.link(path, link)
    samples, classes = packing.samples_from_folder(folder)
    packing.write_dataset(samples, packed, classes=classes, test_fraction=0.0)
    return packed


def training_labels(root: Path) -> tuple[list[str], dict[str, int]]:
    index = read_index(root)
    labels = index.labels_of("cv")
    return index.urls("cv"), {s: y for i, (s, y) in enumerate(sorted(labels.items())) if i % 5}


def distrain_loader(urls, labels, workers):
    return loaders.train_loader(urls, labels, batch_size=BATCH, num_workers=workers, shuffle_buffer=BUFFER, seed=0,
                                decode=loaders.train_decoder(TRANSFORM, AUGMENT, stream_seed=0))  # fmt: skip


def distrain_batches(urls, labels, workers):
    on_device = BatchAugment(TRANSFORM, AUGMENT, num_classes=10, label_smoothing=0.0, device="cpu")
    for images, targets, _ids in distrain_loader(urls, labels, workers):
        yield on_device(images, targets)[0]


def distrain_loader_batches(urls, labels, workers):
    for images, _targets, _ids in distrain_loader(urls, labels, workers):
        yield images


def timm_batches(urls, labels, workers):
    import webdataset as wds
    from timm.data import create_transform

    from distrain.data.augment import patch_timm_posterize

    patch_timm_posterize()  # timm 1.0 + Pillow 13 crash on posterize(0 bits) without it, distrain or not
    transform = create_transform(SIZE, is_training=True, scale=tuple(AUGMENT.scale), hflip=AUGMENT.hflip,
                                 auto_augment=AUGMENT.auto_augment, re_prob=AUGMENT.re_prob, re_mode="pixel",
                                 interpolation="bicubic", mean=TRANSFORM.mean, std=TRANSFORM.std)  # fmt: skip
    dataset = (
        wds.WebDataset(urls, shardshuffle=False, nodesplitter=wds.split_by_node, empty_check=False)
        .select(lambda sample: sample["__key__"] in labels)
        .shuffle(BUFFER)
        .decode("pil")
        .to_tuple("jpg", "cls")
        .map_tuple(transform, int)
        .batched(BATCH, partial=False)
    )
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers)
    for images, _targets in loader:
        yield images


def decode_batches(urls, labels, workers):
    decode_only = ImageTransform(SIZE, 3, interpolation=TRANSFORM.interpolation, crop_pct=1.0)
    for images, _targets, _ids in loaders.eval_loader(urls, labels, batch_size=BATCH, transform=decode_only,
                                                      num_workers=workers):  # fmt: skip
        yield images


PIPELINES = {"distrain": distrain_batches, "timm": timm_batches, "distrain_loader": distrain_loader_batches,
             "decode": decode_batches}  # fmt: skip


def images_per_s(pipeline, urls, labels, workers) -> float:
    """Steady-state throughput of one pass: images after the first batch / time after the first batch."""
    batches = PIPELINES[pipeline](urls, labels, workers)
    n_batches = len(labels) // BATCH
    first = next(batches)
    start, seen = time.perf_counter(), 0
    for _, batch in zip(range(n_batches - 1), batches):  # timm's: each worker drops its last partial batch
        seen += len(batch)
    seconds = time.perf_counter() - start
    batches.close()
    assert first.shape[-1] == SIZE
    return seen / seconds


RSS_PROBE = """
import resource, sys, pathlib
sys.path.insert(0, sys.argv[2])
from benchmarks.loader import training_labels, distrain_batches, TRANSFORM
from distrain.data import loaders
urls, labels = training_labels(pathlib.Path(sys.argv[1]))
for _ in distrain_batches(urls, labels, 2):  # the endless training stream: one pass of it
    break
stream = distrain_batches(urls, labels, 2)
for _ in range(len(labels) // 64):
    next(stream)
stream.close()
for _ in loaders.eval_loader(urls, labels, batch_size=128, transform=TRANSFORM, num_workers=2):
    pass
self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
child_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print("PEAK_KB", self_kb, child_kb)
"""


def peak_rss_mib(root: Path) -> tuple[float, float]:
    """(main process, largest worker) peak RSS in MiB of a training + evaluation pass in a fresh process."""
    repo = str(Path(__file__).resolve().parents[1])
    proc = subprocess.run([sys.executable, "-c", RSS_PROBE, str(root), repo], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("PEAK_KB"))
    main_kb, child_kb = (int(x) for x in line.split()[1:])
    return main_kb / 1024, child_kb / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)  # the loaders' work is per sample; leave the cores to the workers
    work = Path(args.workdir or tempfile.mkdtemp(prefix="distrain-loader-bench-"))
    root = prepare(work, args.images, 1)
    urls, labels = training_labels(root)
    print(
        f"{args.images} JPEGs in {len(urls)} shards; {len(labels)} training samples per pass, {SIZE} px, batch {BATCH}"
    )
    runs: dict[tuple[str, int], list[float]] = {}
    for repeat in range(args.repeats):
        for workers in args.workers:
            for name in PIPELINES:
                runs.setdefault((name, workers), []).append(images_per_s(name, urls, labels, workers))
        print(f"repeat {repeat + 1}/{args.repeats} done", flush=True)
    figures: dict = {"benchmark": "loader", "images": args.images, "image_size": SIZE, "batch": BATCH,
                     "repeats": args.repeats}  # fmt: skip
    print(f"{'workers':>7}  {'distrain':>9}  {'timm':>9}  {'vs timm':>7}  {'loader':>9}  {'decode':>9}  "
          f"{'vs decode':>9}  (images/s)")  # fmt: skip
    for workers in args.workers:
        med = {name: statistics.median(runs[(name, workers)]) for name in PIPELINES}
        vs_timm, vs_decode = med["distrain"] / med["timm"], med["distrain_loader"] / med["decode"]
        print(f"{workers:>7}  {med['distrain']:>9.1f}  {med['timm']:>9.1f}  {vs_timm:>7.3f}  "
              f"{med['distrain_loader']:>9.1f}  {med['decode']:>9.1f}  {vs_decode:>9.3f}")  # fmt: skip
        for name in PIPELINES:
            figures[f"{name}_images_per_s_w{workers}"] = round(med[name], 1)
        figures[f"ratio_vs_timm_w{workers}"] = round(vs_timm, 3)
        figures[f"ratio_vs_decode_w{workers}"] = round(vs_decode, 3)
    figures["ratio_vs_timm"] = min(figures[f"ratio_vs_timm_w{w}"] for w in args.workers)
    figures["ratio_vs_decode"] = min(figures[f"ratio_vs_decode_w{w}"] for w in args.workers)
    main_1x, worker_1x = peak_rss_mib(root)
    main_4x, worker_4x = peak_rss_mib(prepare(work, args.images, 4))
    growth = (main_4x + worker_4x) / (main_1x + worker_1x)
    print(f"peak RSS, main + largest worker: 1x {main_1x:.0f} + {worker_1x:.0f} MiB, 4x {main_4x:.0f} + "
          f"{worker_4x:.0f} MiB: growth {growth:.3f} (target <= 1.10)")  # fmt: skip
    figures.update(rss_main_mib_1x=round(main_1x, 1), rss_worker_mib_1x=round(worker_1x, 1),
                   rss_main_mib_4x=round(main_4x, 1), rss_worker_mib_4x=round(worker_4x, 1),
                   rss_growth=round(growth, 3))  # fmt: skip
    figures["targets_met"] = bool(figures["ratio_vs_timm"] >= 1.0 and figures["ratio_vs_decode"] >= 0.8
                                  and growth <= 1.10)  # fmt: skip
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
