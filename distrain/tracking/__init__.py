"""Experiment tracking behind one interface (`base.Tracker`): MLflow on the primary rank (`mlflow_tracker`), its
calls as typed values (`ops`) executed at once or kept in an offline buffer (`buffer`), runs created once
whatever fails (`runs`), the registered ensemble model (`registry`), optional system metrics
(`system_metrics`); a tracker that does nothing elsewhere. Only this package imports mlflow."""
