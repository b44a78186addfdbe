"""SIGTERM at any moment of a distrain process: one line, exit 75 (or 0 when nothing was left), nothing half-written.

Kubernetes, Slurm and spot reclaims send SIGTERM, then SIGKILL after a grace period (often 15-30 s). `install`
puts one handler in place as the first thing a command does, before the heavy imports, and it acts in one of
two regimes:

- **immediate** (start-up, reading data, opening tracking): the handler raises `Terminated` wherever the main
  thread is, except inside an import: an exception unwinding through a half-imported extension module (torch)
  aborts the interpreter (exit -6, seen in a test), so there the raise waits, re-checked every 50 ms (SIGALRM),
  until the import is over. Every file distrain writes is written atomically (temporary file, then rename or
  hard link), so stopping elsewhere leaves nothing half-written. `Terminated` is a BaseException, like
  KeyboardInterrupt, so no library's `except Exception` swallows it.
- **deferred** (`with deferred():` a worker's claim loop, a sync): the handler only sets `STOP`. The code
  polls `stop_requested()` where stopping is safe (an optimizer step, between jobs, between tracking calls),
  saves what it must and raises `Preempted` (exit 75).

This module imports only the standard library and `distrain.errors`.
"""

from __future__ import annotations

import atexit
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from distrain.errors import EXIT_PREEMPTED, exit_with_line

STOP = threading.Event()  # set by SIGTERM; never cleared (a stopping process stops)
_deferred_depth = 0
_disarm_at_exit: list = []
_disarmed = False


class Terminated(BaseException):
    """SIGTERM arrived outside a deferred section: the command stops where it is (exit 75)."""

    exit_code = EXIT_PREEMPTED


def install() -> None:
    """Handle SIGTERM from now on (main thread only; a no-op elsewhere, e.g. in a test's worker thread)."""
    global _disarmed
    _disarmed = False  # a new command begins (tests run several in one process)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)


def _on_sigterm(signum, frame) -> None:
    already = STOP.is_set()
    STOP.set()
    if _deferred_depth == 0 and not already:
        _raise_when_safe(frame)


def _raise_when_safe(frame) -> None:
    if _deferred_depth > 0 or _disarmed:
        return  # a deferred section began meanwhile (its polls see STOP), or the command is returning
    if _importing(frame):
        signal.signal(signal.SIGALRM, lambda signum, later: _raise_when_safe(later))
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        if not _disarm_at_exit:  # a timer left armed would kill the exit (-14)
            _disarm_at_exit.append(atexit.register(signal.setitimer, signal.ITIMER_REAL, 0))
        return
    raise Terminated("stopped by SIGTERM")


def _importing(frame) -> bool:
    """Whether the main thread is inside an import (a frame of importlib's machinery on its stack)."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def disarm() -> None:
    """The command is returning its exit code: no raise from here on (a re-check timer firing in the interpreter's
    shutdown would print a traceback from whatever finalizer it interrupted)."""
    global _disarmed
    _disarmed = True
    signal.setitimer(signal.ITIMER_REAL, 0)


def stop_requested() -> bool:
    """True once SIGTERM arrived: finish the current step, save, and stop."""
    return STOP.is_set()


@contextmanager
def deferred() -> Iterator[None]:
    """Inside: SIGTERM only sets `STOP`; the code polls `stop_requested()` at its safe points. A SIGTERM that
    arrived just before entering is still seen by the first poll."""
    global _deferred_depth
    _deferred_depth += 1
    try:
        yield
    finally:
        _deferred_depth -= 1


def exit_stopped(detail: str = "before any job was claimed; nothing is lost") -> int:
    """The one line and exit code of a command stopped by SIGTERM (75: run it again to go on)."""
    return exit_with_line(f"distrain: stopped by SIGTERM {detail} (exit {EXIT_PREEMPTED})", EXIT_PREEMPTED)
