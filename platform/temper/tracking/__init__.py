"""Experiment tracking in MLflow.

The driver creates the run (`start_run`) and ends it (`end_run`); it passes
`{"run_id": ..., "tracking_uri": ...}` to the workers, where `build_tracker` gives rank 0 an
`MlflowTracker` (non-blocking, buffered, retried) and every other rank a `NoopTracker`.

mlflow itself is imported lazily: workers other than rank 0 never import it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from temper.tracking.base import NoopTracker, Tracker
from temper.tracking.mlflow_tracker import MlflowTracker
from temper.tracking.runs import RunHandle, end_run, resolve_tracking_uri, start_run


def build_tracker(run_info: Mapping[str, Any] | None, *, rank: int, spec: Any) -> Tracker:
    """Rank 0 of a tracked job logs to the driver's run; everything else is a NoopTracker."""
    if rank != 0 or not run_info or not spec.tracking.enabled:
        return NoopTracker()
    run_id, uri = run_info.get("run_id"), run_info.get("tracking_uri")
    if not run_id or not uri:
        return NoopTracker()
    return MlflowTracker(
        run_id=run_id,
        tracking_uri=uri,
        flush_every_s=spec.tracking.flush_every_s,
        max_buffered=spec.tracking.max_buffered,
    )


__all__ = [
    "MlflowTracker", "NoopTracker", "RunHandle", "Tracker", "build_tracker", "end_run",
    "resolve_tracking_uri", "start_run",
]
