"""Atomic file writes: a reader sees the old file or the whole new one, never half of one.

Write to a temporary file in the same directory, fsync it, then rename over the target
(rename is atomic on POSIX file systems, NFS included for a single client).
`create_exclusive_json` creates a file only if it does not exist (hard link of a complete temporary
file), which is how the ledger and the MLflow study marker settle races between workers.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Optional

from distrain.errors import StorageError, storage_cause


def _current_umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it; set it straight back
    os.umask(mask)
    return mask


# mkstemp creates files mode 0600; written files get the mode open() would give them (0644 under the
# usual umask 022), so report.json and friends are readable by the team and the MLflow server.
_FILE_MODE = 0o666 & ~_current_umask()


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Call `write(fileobj)` on a temporary file, then atomically move it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, _FILE_MODE)
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        full = isinstance(e, Exception) and _disk_full(path.parent)  # before the partial file is freed
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        cause = storage_cause(e)
        if full or cause is not None:
            problem = cause.strerror if cause is not None else "no space left on device"
            raise StorageError(f"cannot write {path}: {problem}; free space, fix the permissions or choose another "
                               f"run_root / --out") from None  # fmt: skip
        raise


def _disk_full(folder: Path) -> bool:
    try:
        return os.statvfs(folder).f_bavail == 0
    except OSError:
        return False


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda f: f.write(text), mode="w")


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def create_exclusive_json(path: Path, obj: dict) -> bool:
    """Create `path` with JSON `obj` unless it exists; atomic and complete for every reader.
    True if this call created it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(tmp, path)  # fails with FileExistsError if another writer got there first
        return True
    except FileExistsError:
        return False
    except OSError:  # a volume without hard links: O_EXCL create is atomic too (content written after)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f)
        return True
    finally:
        os.unlink(tmp)


def read_json_if_complete(path: Path) -> Optional[Any]:
    """The JSON in `path`, or None when it does not exist or is not complete yet (an O_EXCL-created file read
    before its content was written, on a volume without hard links)."""
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


@contextlib.contextmanager
def exclusive_lock(path: Path, wait: bool = True, waiting: str = "") -> Iterator[bool]:
    """An advisory lock on `path` held while the block runs (released if the process dies); yields whether it
    is held: with `wait` False, False at once when another process holds it; else it waits, first printing
    `waiting` if given. flock is POSIX-lock backed on NFS, so it also excludes a process on another node."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                yield False
                return
            if waiting:
                print(waiting, flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
