"""The processes of one worker as one object: who runs rank-0-only work, who prints, and how every rank gets
its result. Orchestration code asks `ranks.primary(fn)` instead of checking ranks itself."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Optional, TypeVar

if TYPE_CHECKING:
    from accelerate import Accelerator

T = TypeVar("T")


class Ranks:
    """One process (no accelerator), or the ranks of an accelerate process group."""

    def __init__(self, accelerator: Optional[Accelerator] = None, log: Optional[Callable[[str], None]] = None):
        self.accelerator = accelerator
        self._log = log

    @property
    def is_primary(self) -> bool:
        """This process is the group's rank 0 (the one that talks to the ledger, the disk and MLflow)."""
        return self.accelerator is None or self.accelerator.is_main_process

    def primary(self, fn: Callable[[], T]) -> T:
        """Run `fn` on rank 0 while the others wait; rank 0's result (or its exception) on every rank."""
        if self.accelerator is None:
            return fn()
        from distrain.distributed.runtime import on_primary  # late: accelerate (seconds), for a process group only

        return on_primary(self.accelerator, fn)

    def per_node(self, fn: Callable[[], T]) -> T:
        """Run `fn` on each node's local rank 0 (nodes may not share a disk); rank 0's result on every rank."""
        if self.accelerator is None:
            return fn()
        from distrain.distributed.runtime import on_primary

        return on_primary(self.accelerator, fn, per_node=True)

    def log(self, message: str) -> None:
        """Say `message` once per group (rank 0 prints it)."""
        if self.is_primary:
            (self._log or _print)(message)


def _print(message: str) -> None:
    print(message, flush=True)
