"""`distrain data pack` memory: peak RSS packing N images and 4N images (target: 4N <= 1.10 x N), each in a
fresh process, plus the time per image. Images are JPEGs of varied size around 500x375 in 10 class folders, or
with `--detection` synthetic receipts (`distrain data synth-text`, 250 drawn, the rest hard links under their own
names) packed with their word polygons from one annotations.json.

    python benchmarks/pack.py [--images 500] [--detection] [--workdir DIR]   (an existing DIR's images are reused)

Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

# Imports first (their transient peak would hide what packing holds), then RSS sampled every 5 ms while
# packing runs: the baseline before, and the peak during.
MEASURE = """
import os, sys, threading, time
import distrain.cli, distrain.data.pack, sklearn.model_selection, webdataset
page = os.sysconf("SC_PAGE_SIZE")
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page
peak, done = [rss()], threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], rss())
        time.sleep(0.005)
baseline = rss()
t = threading.Thread(target=sample, daemon=True)
t.start()
rc = distrain.cli.main(sys.argv[1:])
done.set()
t.join()
print("RSS_BYTES", baseline, max(peak[0], rss()))
sys.exit(rc)
"""


def make_images(root: Path, count: int, seed: int) -> int:
    """`count` JPEGs (smooth gradients plus noise, 400-600 x 300-450 px) over 10 class folders; total bytes."""
    rng = np.random.default_rng(seed)
    total = 0
    for i in range(count):
        w, h = int(rng.integers(400, 601)), int(rng.integers(300, 451))
        y, x = np.mgrid[0:h, 0:w]
        base = np.stack([(x * (c + 1) + y * (3 - c)) % 256 for c in range(3)], axis=-1).astype(np.float32)
        pixels = np.clip(base + rng.normal(0, 12, size=base.shape), 0, 255).astype(np.uint8)
        folder = root / f"class{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"img{i:06d}.jpg"
        Image.fromarray(pixels).save(path, quality=85)
        total += path.stat().st_size
    return total


def make_receipts(root: Path, count: int, seed: int, unique: int = 250) -> int:
    """`count` synthetic receipts and their annotations.json under root; total image bytes. Beyond `unique` of
    them (drawing one takes ~0.2 s), receipt i is a hard link to receipt i % unique under its own name, with its
    own entry: packing still reads, checks and writes every one."""
    from distrain.data.synth_text import write_synth_text

    drawn = root / "drawn"
    write_synth_text(drawn, min(count, unique), seed=seed)
    entries = json.loads((drawn / "annotations.json").read_text())["images"]
    (root / "images").mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(count):
        source = entries[i % len(entries)]
        name = f"receipt-{i:06d}.jpg"
        (root / "images" / name).hardlink_to(drawn / "images" / source["file"])
        out.append({**source, "file": name})
    (root / "annotations.json").write_text(json.dumps({"images": out}))
    shutil.rmtree(drawn / "images")  # the links keep the files
    return sum(p.stat().st_size for p in (root / "images").glob("*.jpg"))


def pack(images: Path, out: Path, detection: bool = False) -> tuple[float, float, float]:
    """(RSS before packing, peak RSS while packing, both MiB; seconds) of `distrain data pack` in a fresh
    process. Set PYTHONPATH to an older checkout to measure its packing the same way."""
    start = time.perf_counter()
    source = ["--images", str(images / "images"), "--detection", str(images / "annotations.json")] if detection \
        else ["--images", str(images)]  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", MEASURE, "data", "pack", *source, "--out", str(out)],
                          capture_output=True, text=True)  # fmt: skip
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-2000:])
    seconds = time.perf_counter() - start
    baseline, peak = (
        int(x) for x in next(ln for ln in proc.stdout.splitlines() if ln.startswith("RSS_BYTES")).split()[1:]
    )
    return baseline / 2**20, peak / 2**20, seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=500)
    ap.add_argument("--detection", action="store_true", help="synthetic receipts packed with --detection")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="distrain-pack-bench-"))
    kind = "receipts" if args.detection else "images"
    sizes = {}
    for factor in (1, 4):
        folder = work / f"{kind}-x{factor}"
        existing = sorted(folder.rglob("*.jpg")) if folder.is_dir() else []
        if len(existing) == args.images * factor:
            sizes[factor] = sum(p.stat().st_size for p in existing)
        elif args.detection:
            sizes[factor] = make_receipts(folder, args.images * factor, seed=factor)
        else:
            sizes[factor] = make_images(folder, args.images * factor, seed=factor)
        for packed in work.glob(f"packed-{kind}-x{factor}"):
            shutil.rmtree(packed)
    results = {factor: pack(work / f"{kind}-x{factor}", work / f"packed-{kind}-x{factor}", args.detection)
               for factor in (1, 4)}  # fmt: skip
    (base1, peak1, s1), (base4, peak4, s4) = results[1], results[4]
    ratio = peak4 / peak1
    for factor, (base, peak, secs) in results.items():
        n = factor * args.images
        print(f"{n} images ({sizes[factor] / 1e6:.0f} MB): RSS {base:.0f} MiB before packing, peak {peak:.0f} MiB "
              f"while packing (+{peak - base:.0f}), {secs / n * 1e3:.2f} ms/image")  # fmt: skip
    print(f"peak RSS while packing, 4x / 1x = {ratio:.3f} (target <= 1.10)")
    figures = {"benchmark": "pack", "kind": kind, "images_1x": args.images, "mb_1x": round(sizes[1] / 1e6, 1),
               "mb_4x": round(sizes[4] / 1e6, 1), "baseline_mib_1x": round(base1, 1), "peak_mib_1x": round(peak1, 1),
               "baseline_mib_4x": round(base4, 1), "peak_mib_4x": round(peak4, 1), "rss_ratio_4x_1x": round(ratio, 3),
               "ms_per_image_1x": round(s1 / args.images * 1e3, 2),
               "ms_per_image_4x": round(s4 / (4 * args.images) * 1e3, 2), "target_met": ratio <= 1.10}  # fmt: skip
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
