"""`temper runs sync FOLDER`: deliver metrics that a job kept on disk because MLflow stayed
unreachable until it ended (see temper.tracking.spool for the folder's layout).

- meta.json names the run: its segments go to that run, oldest first.
- No run id (the server was down for the whole job): the run is created now, in the
  job's experiment, with the job's spec.yaml (params and artifact) when the driver left
  it there, and ended with the job's recorded status.
The folder is removed once everything is delivered; run it again after a failure.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from temper.errors import TemperError
from temper.tracking.spool import Spool


@dataclass(frozen=True)
class SyncResult:
    run_id: str
    tracking_uri: str
    sent: int
    created: bool


def sync_spool(folder: str | Path, *, tracking_uri: str | None = None, timeout_s: float = 300.0) -> SyncResult:
    spool = Spool(folder, max_bytes=2**62)
    if not spool.folder.is_dir() or not (spool.folder / "meta.json").exists():
        raise TemperError(f"{folder}: not a tracking spool folder (no meta.json); pass the folder "
                          "that the job's warning named")
    meta = spool.read_meta()
    uri = tracking_uri or meta.get("tracking_uri")
    if not uri:
        raise TemperError(f"{folder}/meta.json names no tracking server; pass --tracking-uri")
    from temper.tracking.runs import check_reachable

    check_reachable(uri)
    run_id, created = meta.get("run_id"), False
    if not run_id:
        run_id, created = _create_run(spool, meta=meta, uri=uri), True
        spool.write_meta({"run_id": run_id})
    from temper.tracking.mlflow_tracker import MlflowTracker

    waiting = spool.count()
    tracker = MlflowTracker(run_id=run_id, tracking_uri=uri, spool_dir=spool.folder, flush_every_s=0.2)
    tracker.close(timeout_s=timeout_s)
    if tracker.pending or tracker.rejected:
        raise TemperError(f"{folder}: {tracker.pending} metrics still undelivered, {tracker.rejected} rejected "
                          f"by {uri}; run `temper runs sync {folder}` again")
    if created and meta.get("status"):
        from temper.tracking.backend import MlflowBackend

        MlflowBackend(uri).set_terminated(run_id, status=meta["status"], end_time_ms=int(time.time() * 1000))
    return SyncResult(run_id=run_id, tracking_uri=uri, sent=waiting, created=created)


def _create_run(spool: Spool, *, meta: dict, uri: str) -> str:
    """The run the driver could not create: same experiment, name, params and spec.yaml."""
    from mlflow import MlflowClient
    from mlflow.entities import Param

    from temper.spec.loader import flatten, spec_to_dict
    from temper.tracking.runs import PARAMS_PER_BATCH, fit_param_value

    client = MlflowClient(tracking_uri=uri)
    name = meta.get("experiment") or "temper"
    experiment = client.get_experiment_by_name(name)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(name)
    tags = {"temper.synced_from": str(spool.folder), "temper.launcher": meta.get("launcher", "unknown")}
    if meta.get("error"):
        tags["temper.error"] = str(meta["error"])[:5000]
    run_id = client.create_run(experiment_id, run_name=meta.get("run_name"), tags=tags).info.run_id
    spec_file = spool.folder / "spec.yaml"
    if spec_file.exists():
        from temper.spec.loader import load_spec

        spec = load_spec(spec_file, [])
        params = [Param(k, fit_param_value(k, v)) for k, v in flatten(spec_to_dict(spec)).items()]
        for i in range(0, len(params), PARAMS_PER_BATCH):
            client.log_batch(run_id, params=params[i:i + PARAMS_PER_BATCH], synchronous=True)
        client.log_artifact(run_id, str(spec_file))
    return run_id
