"""Running a study over many workers: the ledger of jobs (claim, lease, heartbeat), the worker loop, W
workers on one node, and the experiment's phases that `run.py` and the `distrain` commands call."""
