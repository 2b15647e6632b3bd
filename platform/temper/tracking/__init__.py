"""Experiment tracking in MLflow.

The driver creates the run (`start_run`) and ends it (`end_run`); it passes
a `RunInfo` (temper/run_info.py) to the workers, where `build_tracker` gives rank 0 an
`MlflowTracker` (non-blocking, buffered, retried) and every other rank a `NoopTracker`.

mlflow itself is imported lazily: workers other than rank 0 never import it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from temper.run_info import RunInfo
from temper.tracking.base import NoopTracker, Tracker
from temper.tracking.mlflow_tracker import MlflowTracker
from temper.tracking.runs import RunHandle, end_run, resolve_tracking_uri, start_run


def build_tracker(run_info: RunInfo, *, rank: int, spec: Any,
                  run_id_source: Callable[[], str | None] | None = None) -> Tracker:
    """Rank 0 of a tracked job logs to the driver's run; everything else is a NoopTracker.
    Without a run id yet (the server was down at start) rank 0 buffers and asks
    `run_id_source` until the driver has created the run."""
    if rank != 0 or not spec.tracking.enabled:
        return NoopTracker()
    run_id, uri = run_info.run_id, run_info.tracking_uri
    if not uri or (not run_id and run_id_source is None):
        return NoopTracker()
    return MlflowTracker(
        run_id=run_id or None,
        tracking_uri=uri,
        flush_every_s=spec.tracking.flush_every_s,
        max_buffered=spec.tracking.max_buffered,
        run_id_source=run_id_source,
        spool_dir=run_info.spool_dir,
        max_spill_mb=spec.tracking.max_spill_mb,
        meta={"experiment": run_info.experiment, "run_name": run_info.run_name},
    )


__all__ = [
    "MlflowTracker", "NoopTracker", "RunHandle", "Tracker", "build_tracker", "end_run",
    "resolve_tracking_uri", "start_run",
]
