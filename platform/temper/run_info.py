"""RunInfo: what the driver tells every worker about the job's run, typed and frozen.

The driver (launch/driver.py) builds it once the MLflow run and the checkpoint folder are
known; it crosses the driver/worker line as plain data (`to_dict()`: JSON for torchrun, a
pickled dict for Ray) and `runtime.entry` turns it back into a RunInfo with `from_dict()`.
Workers read its fields, never a loose dict:

    run_id, tracking_uri     the MLflow run rank 0 logs into (None: tracking off, or the
                             server was down at start and the run is created later)
    run_id_file              where the driver writes that late run id (rank 0 polls it)
    spool_dir                rank 0's on-disk outbox for metrics the server did not take
    experiment, run_name     to create the run later, if the server was down for the whole job
    checkpoint_dir           this run's checkpoint folder (None: checkpointing off)
    init_from                where init_from's weights are (resolved by the driver)
    run_folder               where each rank writes logs/rank-N.txt (and profile/): the
                             driver uploads the folder to the MLflow run at the end
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any


@dataclass(frozen=True)
class InitFromLocation:
    """Where the workers read init_from's weights: a local or remote folder (`path`); a
    registry version (`model_uri`) is fetched again on a node where that folder is absent."""

    path: str
    storage_options: dict[str, Any] | None = None
    model_uri: str | None = None
    tracking_uri: str | None = None


@dataclass(frozen=True)
class RunInfo:
    run_id: str | None = None
    tracking_uri: str | None = None
    run_id_file: str | None = None
    spool_dir: str | None = None
    experiment: str | None = None
    run_name: str | None = None
    checkpoint_dir: str | None = None
    init_from: InitFromLocation | None = None
    run_folder: str | None = None

    def with_(self, **changes: Any) -> RunInfo:
        """A copy with `changes` (the driver fills it in as it learns more)."""
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for the trip to the workers (JSON-serializable)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | RunInfo | None) -> RunInfo:
        """The inverse of `to_dict`; None gives an empty RunInfo (tests, in-process use)."""
        if data is None:
            return cls()
        if isinstance(data, RunInfo):
            return data
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"RunInfo: unknown fields {unknown} (driver and worker run different temper versions?)")
        values = dict(data)
        if values.get("init_from") is not None:
            values["init_from"] = InitFromLocation(**values["init_from"])
        return cls(**values)
