"""Gradient checkpointing: peak memory and step time with and without it, side by side.

    python benchmarks/memory.py                      # resnet50, 224 px, batch 32 (the issue's setting)
    python benchmarks/memory.py --model resnet18 --steps 2

Each setting runs in a fresh subprocess (so one setting's allocator state cannot flatter the other) and
trains through distrain's own path: training.models.create_model -> distributed.wrap (checkpointing -> DDP/accelerate)
-> micro_step (forward, backward, AdamW step). On CPU the figure is the subprocess's peak RSS
(getrusage ru_maxrss); on a GPU it is torch.cuda.max_memory_allocated. Step time is the median of the
timed steps after one warm-up step. On CPU both settings run twice: with glibc's default allocator and
with MALLOC_MMAP_THRESHOLD_=131072 (large blocks returned to the OS on free), because the default
allocator's retention, not the model, decides much of a CPU peak. Prints ratios, then one JSON line
with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def child(args) -> None:
    sys.path.insert(0, str(REPO))
    import torch

    from distrain.config import OptimConfig, TrainConfig
    from distrain.distributed import runtime
    from distrain.distributed.wrap import wrap
    from distrain.training.models import create_model
    from distrain.training.optim import create_optimizer

    train = TrainConfig(batch_size=args.batch, progress=False, precision=args.precision)
    acc = runtime.create_accelerator(train)
    torch.manual_seed(0)
    model = create_model(args.model, num_classes=1000, in_chans=3)
    trainable = wrap(acc, model, create_optimizer(model, OptimConfig()), train, grad_checkpointing=bool(args.ckpt))
    criterion = torch.nn.CrossEntropyLoss()
    x = torch.randn(args.batch, 3, args.size, args.size, device=acc.device)
    y = torch.randint(0, 1000, (args.batch,), device=acc.device)
    cuda = acc.device.type == "cuda"
    trainable.train()
    rss_before_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(args.steps + 1):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        loss, _, _ = trainable.micro_step(x, y, criterion)
        float(loss)
        if cuda:
            torch.cuda.synchronize()
        if i > 0:  # the first step allocates optimizer state and warms caches
            times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(
        json.dumps(
            {
                "ckpt": bool(args.ckpt),
                "peak_bytes": peak,
                "rss_before_steps_bytes": rss_before_kb * 1024,
                "step_s": statistics.median(times),
                "device": str(acc.device),
                "device_name": torch.cuda.get_device_name() if cuda else "cpu",
                "threads": torch.get_num_threads(),
            }
        )
    )


# glibc keeps freed blocks below its (self-raising) mmap threshold in its arenas, so on CPU a process's
# peak RSS also measures allocator retention. With this threshold every block of 128 KiB or more is
# mmapped and returned to the OS when freed, and peak RSS follows the memory the step actually holds.
MMAP_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def run_setting(args, ckpt: int, env: dict) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--model",
        args.model,
        "--size",
        str(args.size),
        "--batch",
        str(args.batch),
        "--steps",
        str(args.steps),
        "--precision",
        args.precision,
        "--ckpt",
        str(ckpt),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore", **env})
    if proc.returncode != 0:
        sys.exit(f"benchmark setting ckpt={ckpt} {env or ''} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compare(base: dict, ck: dict) -> dict:
    mem_ratio = ck["peak_bytes"] / base["peak_bytes"]
    time_ratio = ck["step_s"] / base["step_s"]
    growth = (ck["peak_bytes"] - ck["rss_before_steps_bytes"]) / (base["peak_bytes"] - base["rss_before_steps_bytes"])
    mib = 2**20
    return {
        "peak_mib_no_ckpt": round(base["peak_bytes"] / mib, 1),
        "peak_mib_ckpt": round(ck["peak_bytes"] / mib, 1),
        "step_s_no_ckpt": round(base["step_s"], 4),
        "step_s_ckpt": round(ck["step_s"], 4),
        "peak_memory_ratio": round(mem_ratio, 4),
        "step_time_ratio": round(time_ratio, 4),
        "step_growth_ratio": round(growth, 4),
        "target_met": mem_ratio <= 0.60 and time_ratio <= 1.40,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet50")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    p.add_argument("--precision", default="no")
    p.add_argument("--ckpt", type=int, default=None, help=argparse.SUPPRESS)  # internal: run one setting
    args = p.parse_args()
    if args.ckpt is not None:
        return child(args)
    first = run_setting(args, 0, {})
    cuda = first["device"].startswith("cuda")
    allocators = {"default": {}} if cuda else {"default": {}, "mmap-threshold": MMAP_ENV}
    results = {}
    for name, env in allocators.items():
        base = first if name == "default" else run_setting(args, 0, env)
        ck = run_setting(args, 1, env)
        results[name] = (base, ck, compare(base, ck))
    what = "max memory allocated" if cuda else "peak RSS"
    print(
        f"{args.model} {args.size}px batch {args.batch}, {args.steps} timed steps, device {first['device_name']} "
        f"({first['threads']} threads)"
    )
    print(f"{'':46}{what:>22}{'step time':>12}")
    for name, (base, ck, c) in results.items():
        label = "" if cuda else f" [{name} malloc]"
        for row, r in (("no checkpointing", base), ("grad checkpointing", ck)):
            print(f"{row + label:46}{r['peak_bytes'] / 2**20:>18.0f} MiB{r['step_s']:>11.2f}s")
        print(
            f"  peak memory ratio ckpt/no-ckpt: {c['peak_memory_ratio']:.3f} "
            f"({(1 - c['peak_memory_ratio']) * 100:.1f}% less); step time ratio: {c['step_time_ratio']:.3f} "
            f"({(c['step_time_ratio'] - 1) * 100:+.1f}%); growth during the steps ratio {c['step_growth_ratio']:.3f}; "
            f"target (>= 40% less peak memory for <= 40% more step time): {'met' if c['target_met'] else 'NOT met'}"
        )
    print(
        json.dumps(
            {
                "benchmark": "memory",
                "model": args.model,
                "image_size": args.size,
                "batch": args.batch,
                "precision": args.precision,
                "device": first["device_name"],
                "threads": first["threads"],
                "measure": what,
                **{name: c for name, (_, _, c) in results.items()},
            }
        )
    )


if __name__ == "__main__":
    main()
