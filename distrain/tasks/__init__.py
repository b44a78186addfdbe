"""Tasks: what is trained and how its predictions are scored, combined and served (`Task`), one module per kind
of problem, registered by name. `get_task(cfg.task)` is how the rest of distrain reaches one."""

from __future__ import annotations

from distrain.tasks.base import COMPARISONS, LABEL_SETS_KEY, HeadSettings, Label, LossSettings, MetaTarget, Task
from distrain.tasks.classification import Binary, Multiclass, Multilabel, label_set_strata
from distrain.tasks.detection.task import TextDetection
from distrain.tasks.metrics import METRICS, MetricSpec, Threshold, best_index, improves, overfit_gap
from distrain.tasks.pairs import PairBinary, PairMulticlass
from distrain.tasks.semantic import Segmentation

TASKS: dict[str, Task] = {}
"""The registered tasks by name."""

DEFAULT_TASK = Multiclass.name


def register_task(task: Task) -> Task:
    """Make `task` available by its name (as `task:` in a config); a name registered twice is refused."""
    if task.name in TASKS and type(TASKS[task.name]) is not type(task):
        raise ValueError(f"task {task.name!r} is already registered ({type(TASKS[task.name]).__name__})")
    TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    """The registered task called `name` (ValueError naming the registered ones otherwise)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}: one of {tuple(TASKS)}")
    return TASKS[name]


def known_losses() -> tuple[str, ...]:
    """Every `train.loss` some registered task takes, in registration order."""
    return tuple(dict.fromkeys(loss for task in TASKS.values() for loss in task.losses))


def task_of_digits_source(source: str) -> Task | None:
    """The task whose bundled demo data `data.source` names, if any."""
    return next((t for t in TASKS.values() if t.digits_source == source), None)


for _task in (Multiclass(), Binary(), Multilabel(), PairBinary(), PairMulticlass(), TextDetection(), Segmentation()):
    register_task(_task)

__all__ = [
    "COMPARISONS", "DEFAULT_TASK", "HeadSettings", "LABEL_SETS_KEY", "METRICS", "TASKS", "Label", "LossSettings",
    "MetaTarget", "MetricSpec", "Task", "Threshold", "best_index", "get_task", "improves", "known_losses",
    "label_set_strata", "overfit_gap", "register_task", "task_of_digits_source",
]  # fmt: skip
