"""Experiment tracking behind one interface (`base.Tracker`): MLflow with an offline buffer on the
primary rank (`mlflow_tracker`, `buffer`), a tracker that does nothing elsewhere. Only this package
imports mlflow."""
