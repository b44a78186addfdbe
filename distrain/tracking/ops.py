"""The tracking calls as values: what `MlflowTracker` executes at once, or appends to its offline buffer as one
JSON line (`to_json`) that `distrain sync` reads back (`op_from_json`) and executes later through the same code.

The JSON lines keep the format buffers were written in before these classes existed ({"op": "log_metrics",
"run": ..., ...}): a buffer left by an older distrain still replays. Fields added since are optional on reading
(`create_token`, `python_model`, `version_tags`), so an old line gets their defaults.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

PYFUNC_DEFAULT = "distrain.serving.pyfunc:DistrainPyfunc"
"""The pyfunc class of buffered `log_ensemble_model` calls written before the class was named in the call."""


@dataclass(frozen=True)
class Op:
    """One tracking call. `OP` is its "op" value in the buffer; fields listed in `OPTIONAL` are left out of
    the JSON line while empty, as lines written before they existed lack them."""

    OP: ClassVar[str] = ""
    OPTIONAL: ClassVar[tuple[str, ...]] = ()

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"op": self.OP}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name not in self.OPTIONAL or value:
                out[f.name] = value
        return out

    @classmethod
    def from_json(cls, line: dict[str, Any]) -> Op:
        return cls(**{f.name: line[f.name] for f in dataclasses.fields(cls) if f.name in line})

    def run_ids(self) -> tuple[str, ...]:
        """The run ids this call names (placeholders among them mean: buffer it until synced)."""
        return tuple(getattr(self, name) for name in ("run", "parent") if hasattr(self, name))


@dataclass(frozen=True)
class CreateRun(Op):
    """A nested run of the study: a job's (`kind` "job") or an ensemble stage's ("ensemble"). `token` is a
    unique `distrain.create_token` tag: a create whose answer was lost is found by it instead of made twice.
    `ref` is the placeholder run id handed out when the call was buffered."""

    OP: ClassVar[str] = "create_run"
    OPTIONAL: ClassVar[tuple[str, ...]] = ("token", "ref")
    kind: str
    name: str
    parent: str
    tags: dict[str, str]
    params: dict[str, str]
    token: str = ""
    ref: str = ""


@dataclass(frozen=True)
class LogParams(Op):
    OP: ClassVar[str] = "log_params"
    run: str
    params: dict[str, str]


@dataclass(frozen=True)
class LogMetrics(Op):
    OP: ClassVar[str] = "log_metrics"
    run: str
    step: int
    timestamp: int
    metrics: dict[str, float]


@dataclass(frozen=True)
class LogArtifact(Op):
    OP: ClassVar[str] = "log_artifact"
    run: str
    path: str
    artifact_path: str | None


@dataclass(frozen=True)
class EndRun(Op):
    OP: ClassVar[str] = "end_run"
    run: str
    status: str


@dataclass(frozen=True)
class ReopenRun(Op):
    """Mark a run RUNNING again with these tags. `dedupe`: a job's run reopened by a later attempt, whose rows
    sync sends only for (metric, step) pairs the run does not hold yet."""

    OP: ClassVar[str] = "reopen_run"
    OPTIONAL: ClassVar[tuple[str, ...]] = ("dedupe",)
    run: str
    tags: dict[str, str]
    dedupe: bool = False


@dataclass(frozen=True)
class DeleteRun(Op):
    """A run this process created and then found to be a duplicate (another creator's run was recorded)."""

    OP: ClassVar[str] = "delete_run"
    run: str


@dataclass(frozen=True)
class LogEnsembleModel(Op):
    """Log the ensemble as a pyfunc model of class `python_model` ("package.module:ClassName", imported when the
    call executes), register it under `registered_name`, alias that version `champion` and tag it."""

    OP: ClassVar[str] = "log_ensemble_model"
    run: str
    artifacts_dir: str
    registered_name: str
    python_model: str = PYFUNC_DEFAULT
    version_tags: dict[str, str] = field(default_factory=dict)


_ALL = (CreateRun, LogParams, LogMetrics, LogArtifact, EndRun, ReopenRun, DeleteRun, LogEnsembleModel)
OPS: dict[str, type[Op]] = {cls.OP: cls for cls in _ALL}


def op_from_json(line: dict[str, Any]) -> Op:
    """The call a buffer line holds."""
    kind = line.get("op")
    if kind not in OPS:
        raise ValueError(f"unknown tracking operation {kind!r} in the tracking buffer")
    return OPS[kind].from_json(line)
