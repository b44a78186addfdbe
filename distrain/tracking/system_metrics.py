"""MLflow system metrics (CPU, memory, disk, network; GPU utilisation and memory when `pynvml` imports) on a
job's run while the job trains (`tracking.system_metrics`), through MLflow's `SystemMetricsMonitor` for an
explicit run id (no fluent active run). Metrics are named `system/...`."""

from __future__ import annotations

import threading
from typing import Any, Optional


def start_monitor(run_id: str, tracking_uri: str, interval_s: float) -> Optional[Any]:
    """A started monitor logging to `run_id`, continuing the run's earlier system-metric steps (a resumed job);
    None where psutil (which MLflow's monitors need) is missing."""
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
    except ImportError:
        return None
    monitor = SystemMetricsMonitor(run_id, sampling_interval=interval_s, resume_logging=True, tracking_uri=tracking_uri)
    monitor.start()
    return monitor


def stop_monitor(monitor: Any, timeout_s: float) -> None:
    """Stop sampling and send what was sampled. MLflow's `finish` joins its thread without a bound, and that
    thread may be waiting on a server that went away: it runs beside us, waited for `timeout_s` at most."""
    stopping = threading.Thread(target=monitor.finish, daemon=True, name="distrain-system-metrics-stop")
    stopping.start()
    stopping.join(timeout_s)
