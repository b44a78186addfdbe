"""The ensemble as a registered MLflow model, MLflow 3 style: a logged model of the stacking run's experiment,
one registered version per run whatever was retried, the alias `champion` on it and its version tags.

`mlflow.pyfunc.log_model` takes no run id (it logs to the fluent active run). `mlflow.models.Model.log`, which
it wraps, takes one, and a logged model made beforehand in the run's experiment (left to itself it would make
it in the default experiment). Model.log, the logged model's finalising and the registration read the
process-wide tracking URI: it is set for the call only (`process_tracking_uri`).
"""

from __future__ import annotations

import importlib
from typing import Any

from distrain.tracking.client import BoundedClient, process_tracking_uri
from distrain.tracking.ops import LogEnsembleModel

CHAMPION = "champion"  # the alias of the version the latest aggregation registered
PIP_REQUIREMENTS = ["distrain", "torch", "timm", "lightgbm", "pillow"]


def resolve_python_model(path: str) -> Any:
    """The `mlflow.pyfunc.PythonModel` subclass named "package.module:ClassName" (it has a `signature()`)."""
    module, _, name = path.partition(":")
    try:
        model_class = getattr(importlib.import_module(module), name) if module and name else None
    except (ImportError, AttributeError) as e:
        raise ValueError(f"python_model {path!r}: cannot import it ({type(e).__name__}: {e})") from None
    if model_class is None or not callable(getattr(model_class, "signature", None)):
        raise ValueError(f"python_model {path!r}: expected 'package.module:ClassName', a PythonModel with signature()")
    return model_class


def register_ensemble(client: BoundedClient, experiment_id: str, tracking_uri: str, run_id: str,
                      op: LogEnsembleModel) -> str:  # fmt: skip
    """Log and register the ensemble of `op` on `run_id` unless a version of this run exists (an aggregation
    attempt that died before finishing registered it); a version registered twice (an HTTP retry of a create
    whose answer was lost) is deleted. Aliases the version `champion`, tags it; returns it."""
    if not _versions_of(client, run_id, op.registered_name):
        _log_and_register(client, experiment_id, tracking_uri, run_id, op)
    first, *twice = _versions_of(client, run_id, op.registered_name) or [None]
    if first is None:
        raise ConnectionError(f"MLflow did not show the version of {op.registered_name} it registered")
    for version in twice:
        client.delete_model_version(op.registered_name, version)
    client.set_registered_model_alias(op.registered_name, CHAMPION, first)
    for key, value in op.version_tags.items():
        client.set_model_version_tag(op.registered_name, first, key, value)
    return first


def _versions_of(client: BoundedClient, run_id: str, name: str) -> list[str]:
    """The versions of registered model `name` made from `run_id`, oldest first."""
    found = client.search_model_versions(f"run_id = '{run_id}'")
    return [str(v) for v in sorted(int(m.version) for m in found if m.name == name)]


def _log_and_register(client: BoundedClient, experiment_id: str, tracking_uri: str, run_id: str,
                      op: LogEnsembleModel) -> None:  # fmt: skip
    model_class = resolve_python_model(op.python_model)  # first: it may import mlflow.pyfunc without its notice
    import mlflow.pyfunc
    from mlflow.models import Model

    with client.bounded(), process_tracking_uri(tracking_uri):
        logged = client.unbounded.create_logged_model(experiment_id, name="ensemble", source_run_id=run_id)
        Model.log(
            artifact_path=None,
            name="ensemble",
            flavor=mlflow.pyfunc,
            run_id=run_id,
            model_id=logged.model_id,
            python_model=model_class(),
            signature=model_class.signature(),
            artifacts={"ensemble": op.artifacts_dir},
            pip_requirements=PIP_REQUIREMENTS,
            registered_model_name=op.registered_name,
        )
