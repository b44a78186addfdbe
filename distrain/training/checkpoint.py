"""Training-state checkpoints of one job: save atomically with a checksum, load the newest good one.

    <run_dir>/jobs/<job_id>/state/state-000000120.pt     torch.save of a dict of plain types and tensors
    <run_dir>/jobs/<job_id>/state/state-000000120.json   {"sha256": ..., "bytes": ...}, written after the .pt

A checkpoint counts only when its .json exists and the .pt's sha256 matches it, so a truncated or
corrupted file (a node lost mid-write on a volume that does not honour fsync, a bad disk) is
skipped and the previous good one is used. Everything loads with `torch.load(weights_only=True)`:
RNG states are stored as tensors and lists, never as numpy arrays or pickled objects.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import random
import re
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from distrain.fsutil import atomic_write, atomic_write_json

_NAME = re.compile(r"^state-(\d{9})\.pt$")


def rng_state() -> dict:
    """This process's Python, numpy, torch (and CUDA) RNG states, as weights_only-loadable values."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state = {
        "python": [py_version, list(py_internal), py_gauss],
        "numpy": {
            "name": np_state[0],
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` captured."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(
        (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_state(
    directory: Path, step: int, state: dict[str, Any], keep: int = 2, fence: Callable[[], None] = lambda: None
) -> Path:
    """Write `state` as checkpoint number `step` (atomically, with its checksum); keep the newest `keep`.
    `fence` raises when the caller no longer owns the job: called before writing and before pruning, so an
    owner frozen past its lease neither adds its checkpoint to the new owner's nor deletes theirs; one frozen
    between the first call and the write takes back what it wrote (and the directory, when it made it)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getvalue()
    path = directory / f"state-{step:09d}.pt"
    fence()
    existed = directory.is_dir()
    atomic_write(path, lambda f: f.write(payload))
    atomic_write_json(path.with_suffix(".json"), {"sha256": hashlib.sha256(payload).hexdigest(), "bytes": len(payload)})
    try:
        fence()
    except BaseException:  # frozen between the first fence and the write: the job is another owner's (or done)
        path.with_suffix(".json").unlink(missing_ok=True)
        path.unlink(missing_ok=True)
        if not existed:
            with contextlib.suppress(OSError):  # only if empty: never what the new owner wrote
                directory.rmdir()
        raise
    for old in list_states(directory)[keep:]:
        old.with_suffix(".json").unlink(missing_ok=True)
        old.unlink(missing_ok=True)
    return path


def list_states(directory: Path) -> list[Path]:
    """Checkpoint files, newest first."""
    if not directory.is_dir():
        return []
    return sorted((p for p in directory.iterdir() if _NAME.match(p.name)), reverse=True)


def load_latest_state(directory: Path) -> tuple[Optional[dict], Optional[Path]]:
    """The newest checkpoint whose checksum verifies, as (state, path); (None, None) if there is none.
    Bad ones are reported with a warning and skipped."""
    for path in list_states(directory):
        problem = _verify(path)
        if problem is None:
            try:
                return torch.load(path, map_location="cpu", weights_only=True), path
            except Exception as e:  # checksum fine but unreadable: written by an incompatible version
                problem = f"cannot load: {type(e).__name__}: {e}"
        warnings.warn(f"distrain: skipping checkpoint {path}: {problem}", stacklevel=2)
    return None, None


def _verify(path: Path) -> Optional[str]:
    meta = path.with_suffix(".json")
    if not meta.is_file():
        return "no checksum file (write interrupted)"
    try:
        expected = json.loads(meta.read_text())
    except json.JSONDecodeError:
        return "unreadable checksum file"
    if not isinstance(expected, dict):
        return "checksum file holds no checksum record"
    data = path.read_bytes()
    if len(data) != expected.get("bytes"):
        return f"{len(data)} bytes, expected {expected.get('bytes')} (truncated)"
    if hashlib.sha256(data).hexdigest() != expected.get("sha256"):
        return "sha256 mismatch (corrupted)"
    return None


def prune_engine_checkpoints(directory: Path, keep_tags: set[str]) -> None:
    """Delete the engine checkpoint folders (DeepSpeed tags) in `directory` that no kept distrain
    checkpoint refers to. Nothing to do when the directory does not exist (DDP keeps everything in the
    rank-0 file)."""
    if not directory.is_dir():
        return
    for child in directory.iterdir():
        if child.is_dir() and child.name not in keep_tags:
            shutil.rmtree(child, ignore_errors=True)
